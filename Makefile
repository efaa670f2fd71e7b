# Two commands do all the set-up: `make run` and `make test`. Both build .venv when missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/metahpo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check metahpo estimators tasks tests benchmarks
	$(VENV)/bin/ruff format --check metahpo estimators tasks tests benchmarks

# The whole benchmark (about half an hour on 2 cores); results, tables and plots into
# docs/benchmarks/. ARGS="--quick --out /tmp/b" for the smoke size, --help for the options.
bench: $(STAMP)
	$(PY) -m benchmarks --out docs/benchmarks $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun wandb benchmark-results
