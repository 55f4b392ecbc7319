# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create or update .venv first; torch is installed explicitly (a pinned CPU wheel) before the
# project so that no dependency pulls a multi-GB CUDA build.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
INDEX  := $(VENV)/bin/index
STAMP  := $(VENV)/.installed
DEMO   ?= demo-out

.PHONY: venv browser test demo bench-accuracy clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,zoo,quant]'
	touch $(STAMP)

# The browser tests drive Debian's headless Chromium through its chromedriver (never a downloaded build).
# Installed here when missing (root: CI and our machines); without it those tests fail, they do not skip.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else \
	    echo "warning: install chromium and chromium-driver (Debian) for the browser tests" >&2; \
	  fi; \
	fi

# Two workers, a test file each (the CI box has 2 cores): 1075 tests in 615 s against 973 s in one process on
# the dev box (bench/RESULTS.md, session 19). TEST_JOBS=0 runs them in this process.
TEST_JOBS ?= 2
test: $(STAMP) browser
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile

demo: $(STAMP)
	bash bench/demo.sh $(DEMO)

bench-accuracy: $(STAMP)
	$(PY) bench/accuracy.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
