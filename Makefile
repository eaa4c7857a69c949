# The two set-up commands of the README are `make demo` and `make test`; each creates .venv/ on first use.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

$(VENV_STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# CPU wheel first, unless a torch is already there (yours is kept): with torch installed, torch>=2.6 in
	# pyproject is satisfied and no CUDA build is pulled.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(VENV_STAMP)

.PHONY: install demo test test-fast chromium
install: $(VENV_STAMP)

# Headless Chromium renders PNG figures (kaleido) and runs the browser tests; installed when we are root with apt.
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "note: no Chromium: PNG export and browser tests are skipped"

demo: $(VENV_STAMP)
	.venv/bin/mechedit demo

test: $(VENV_STAMP) chromium
	.venv/bin/mechedit models fetch smollm2-135m
	$(PY) -m pytest -q

test-fast: $(VENV_STAMP)
	$(PY) -m pytest -q -m "not real and not slow"
