# The two commands a newcomer needs: `make demo` and `make test`. Each installs into .venv what
# it needs first: the package with the extras it uses (pyproject.toml), re-installing only
# when pyproject.toml changes. One stamp per set of extras, so switching between targets
# installs what the other lacks and nothing twice.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TASK ?= 1

# The extras each target installs (pyproject.toml): demo also brings honcho for the
# Procfile (README, "Running workers"); dev is every extra plus pytest and ruff.
EXTRAS_demo := demo,procfile
EXTRAS_dev := dev
EXTRAS_train := train

.PHONY: demo test lint train
.PRECIOUS: $(VENV)/.installed-%

$(VENV)/.installed-%: pyproject.toml setup.py memnet/_scan.c memnet/_rows.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[$(EXTRAS_$*)]'
	touch $@

demo: $(VENV)/.installed-demo
	$(BIN)/memnet demo

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest

train: $(VENV)/.installed-train
	$(BIN)/memnet train --task $(TASK)
