# The two set-up commands of the README are `make demo` and `make test`; each creates .venv/ on first use.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

$(VENV_STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# CPU wheel first: with it installed, torch>=2.6 in pyproject is satisfied and no CUDA build is pulled.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(VENV_STAMP)

.PHONY: install demo test test-fast
install: $(VENV_STAMP)

demo: $(VENV_STAMP)
	.venv/bin/mechedit demo

test: $(VENV_STAMP)
	.venv/bin/mechedit models fetch smollm2-135m
	$(PY) -m pytest -q

test-fast: $(VENV_STAMP)
	$(PY) -m pytest -q -m "not real and not slow"
