# muse_jax developer entry points. `make demo` and `make test` are the Quick start.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo benchmarks clean-venv

$(STAMP): requirements.txt requirements-test.txt requirements-torch.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt -r requirements-test.txt
	touch $(STAMP)

venv: $(STAMP)

# Test files are spread over TEST_WORKERS processes (pytest-xdist, --dist loadfile: a file's tests run in one
# process, in order). TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) tests

demo: $(STAMP)
	$(PY) -m muse_jax.demo

# Regenerates experiments/BENCHMARKS.md (quick profile; BRCA=<BRCA-M2C folder> adds the data rows).
benchmarks: $(STAMP)
	PYTHONPATH=. $(PY) -m experiments.benchmarks --quick $(if $(BRCA),--brca $(BRCA),)

clean-venv:
	rm -rf $(VENV)
