# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create or update .venv first; torch is installed explicitly (a pinned CPU wheel) before the
# project so that no dependency pulls a multi-GB CUDA build.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
INDEX  := $(VENV)/bin/index
STAMP  := $(VENV)/.installed
DEMO   ?= demo-out

.PHONY: venv test demo bench-accuracy clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,zoo]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	bash bench/demo.sh $(DEMO)

bench-accuracy: $(STAMP)
	$(PY) bench/accuracy.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
