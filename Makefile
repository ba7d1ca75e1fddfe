# `make install` creates .venv and installs the package with the tested versions (constraints.txt).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: install
	$(PY) predict.py image=src/peekaboo/assets/examples/objects.png \
		prompt="a car" prompt="a light bulb" output_dir=outputs/demo

test: install
	$(PY) -m ruff check src tests scripts benchmarks predict.py train.py
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/ablation.py --resume --readme README.md

clean:
	rm -rf outputs runs .pytest_cache
