# Two commands set everything up on a fresh machine:
#   make quickstart   create .venv, install, run jobs/quickstart.yaml on local Ray and print the comparison
#   make test         create .venv if missing, install, run the whole test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install quickstart test test-fast bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/ablate submit jobs/quickstart.yaml
	$(BIN)/ablate report quickstart -o report.html
	@echo "Report:      $(CURDIR)/report.html"
	@echo "MLflow UI:   $(BIN)/ablate ui quickstart      (http://127.0.0.1:5000)"
	@echo "SQL:         $(BIN)/ablate query \"select variant, seed, AP, AP50 from trial_results where job = 'quickstart'\""

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP)
	$(BIN)/ablate bench loss

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
