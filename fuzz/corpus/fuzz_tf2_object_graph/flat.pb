

v
save_counter*
71
VARIABLE_VALUEvv/.ATTRIBUTES/VARIABLE_VALUE*
MG
VARIABLE_VALUEsave_counter'save_counter/.ATTRIBUTES/VARIABLE_VALUE*