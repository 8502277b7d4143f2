# The two set-up commands of the README. Each creates .venv on first use (Python 3.11 + pip only).
VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/speclabel: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/speclabel
	$(BIN)/speclabel demo --out demo-output

test: $(BIN)/speclabel
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(BIN)/speclabel
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) demo-output .pytest_cache .ruff_cache
