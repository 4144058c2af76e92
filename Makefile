# Set-up is automatic: each target creates .venv when it is missing.
# `make demo` needs no root; `make test` also needs Debian's chromium (the report tests drive
# it headless), which it installs with apt-get when /usr/bin/chromium is missing: root, as on CI.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BROWSER := $(VENV)/.chromium

.PHONY: demo test test-all bench clean venv browser

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# The report tests' browser: only the test targets depend on it.
$(BROWSER): $(STAMP)
	test -x /usr/bin/chromium || (apt-get update && apt-get install -y chromium)
	touch $(BROWSER)

venv: $(STAMP)

browser: $(BROWSER)

demo: $(STAMP)
	$(BIN)/qgraph demo

test: $(STAMP) $(BROWSER)
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP) $(BROWSER)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/pipeline.py

clean:
	rm -rf out .pytest_cache
