# Two commands do all the set-up: `make run` and `make test`. Both build .venv when missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# an older editable install left metahpo/configs in site-packages: it would shadow the checkout
	rm -rf $(VENV)/lib/python3*/site-packages/metahpo
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/metahpo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check metahpo estimators tasks tests benchmarks hatch_build.py
	$(VENV)/bin/ruff format --check metahpo estimators tasks tests benchmarks hatch_build.py

# The whole benchmark (about half an hour on 2 cores); results, tables and plots into
# docs/benchmarks/. ARGS="--quick --out /tmp/b" for the smoke size, --help for the options.
bench: $(STAMP)
	$(PY) -m benchmarks --out docs/benchmarks $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun wandb benchmark-results
