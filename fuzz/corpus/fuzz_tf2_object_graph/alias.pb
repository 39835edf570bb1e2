

a
b*

w*

	again*
;5
VARIABLE_VALUEa/wa/w/.ATTRIBUTES/VARIABLE_VALUE*