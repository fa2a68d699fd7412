# Two entry points for a fresh clone: `make demo` and `make test`.
# torch goes in first, pinned, so pip takes the CPU wheel instead of a multi-GB CUDA build.
# On a GPU machine override it, e.g. `make test TORCH_SPEC="torch==2.13.0 --index-url ..."`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: venv dev test test-slow lint clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_SPEC)
	touch $@

venv: $(VENV)/.created

$(VENV)/.dev: $(VENV)/.created pyproject.toml
	$(PIP) install --quiet -e ".[dev]"
	touch $@

dev: $(VENV)/.dev

# pytest exits 5 when it collects nothing; that must fail, and it does (non-zero).
test: dev
	$(PY) -m ruff check src tests
	$(PY) -m pytest -q -m "not slow"

test-slow: dev
	$(PY) -m pytest -q -m slow

lint: dev
	$(PY) -m ruff check src tests
	$(PY) -m ruff format --check src tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
