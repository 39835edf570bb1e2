# One entry point for people and CI. `make test` is what README and .ci/run call.
PYTHON ?= python3
VENV := .venv
TF_VENV := .venv-tf
PY := $(VENV)/bin/python
TF_PY := $(TF_VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: test lint demo docs protos bench clean fuzz-smoke

# The runtime alone (what `make demo` needs), then the test and docs extras on top.
$(VENV)/.runtime: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed: $(VENV)/.runtime plugins/anyckpt-zstd/pyproject.toml plugins/anyckpt-safetensors/pyproject.toml
	$(PY) -m pip install --quiet -e '.[test,docs,dist,fuzz]'
	$(PY) -m pip install --quiet -e plugins/anyckpt-zstd -e 'plugins/anyckpt-safetensors[test]'
	touch $@

# TensorFlow lives in its own venv: the library never imports it; interop tests run it in a
# subprocess. anyckpt is installed there too, to test that both import in one process.
$(TF_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(TF_VENV)
	$(TF_PY) -m pip install --quiet 'tensorflow-cpu==2.21.0'
	$(TF_PY) -m pip install --quiet -e .
	touch $@

test: $(VENV)/.installed $(TF_VENV)/.installed
	$(PY) -m ruff check src tests tools benchmarks plugins
	$(PY) -m mypy
	$(PY) -m mypy --strict plugins/anyckpt-zstd/src plugins/anyckpt-safetensors/src
	$(PY) tools/gen_protos.py --check
	ANYCKPT_TF_PYTHON=$(abspath $(TF_PY)) $(PY) -m pytest $(PYTEST_ARGS)
	$(PY) -m pytest $(PYTEST_ARGS) plugins/anyckpt-zstd/tests plugins/anyckpt-safetensors/tests
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir site
	$(MAKE) fuzz-smoke

# Every atheris harness for 10 s on its committed corpus (fuzz/corpus/), two at a time; any
# crash, hang or over-allocation fails. Longer runs: fuzz/run.py --seconds N (fuzz/README.md).
fuzz-smoke: $(VENV)/.installed
	$(PY) fuzz/run.py --smoke

lint: $(VENV)/.installed
	$(PY) -m ruff check src tests tools benchmarks
	$(PY) -m ruff format --check src tests tools benchmarks
	$(PY) -m mypy

protos: $(VENV)/.installed
	$(PY) tools/gen_protos.py

# The TensorFlow-written fixtures the tests read (tests/fixtures/tf-2.21, committed): rewrites
# them with real TensorFlow, each case verified by reading it back (see their README.md).
.PHONY: fixtures
fixtures: $(TF_VENV)/.installed
	$(TF_PY) tools/tf/make_fixtures.py tests/fixtures/tf-2.21

demo: $(VENV)/.runtime
	$(VENV)/bin/anyckpt demo

clean:
	rm -rf $(VENV) $(TF_VENV) .pytest_cache .mypy_cache .ruff_cache

# The benchmark suite (docs/performance.md): anyckpt against dd, tofile/readinto/copy and its
# peers, each measurement in a fresh process. Creates .venv-bench/ for torch, safetensors and
# Orbax on first use. BENCH_ARGS="--scale 0.1 --runs 1" for a quick look.
# BENCH_ARGS="--distributed-scale" adds the many-rank simulation (docs/distributed.md).
bench: $(VENV)/.installed $(TF_VENV)/.installed
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/run.py $(BENCH_ARGS)
