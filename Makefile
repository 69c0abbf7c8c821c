# `make run`: set up .venv and train SS_MC on the offline default. `make test`: set up and run pytest.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: setup run test clean

$(VENV)/.installed: requirements.txt requirements-assets.txt requirements-plot.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt -r requirements-plot.txt
	$(BIN)/pip install -q --no-deps -r requirements-assets.txt
	touch $@

$(VENV)/.dev: $(VENV)/.installed requirements-dev.txt
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/python train.py

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out
