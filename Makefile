# Two commands set everything up on a fresh machine:
#   make quickstart   create .venv, install, run jobs/quickstart.yaml on local Ray and print the comparison
#   make test         create .venv if missing, install, run the whole test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install quickstart test test-fast bench clean gpu-check cluster-up cluster-down cluster-status

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

# A local Ray cluster (head + 2 workers), an MLflow server and the results store, both on
# PostgreSQL (infra/local/):
#   eval "$$(make -s cluster-up)"   sets RAY_ADDRESS, MLFLOW_TRACKING_URI and ABLATE_STORE in this shell
CLUSTER_STORE ?= postgresql+psycopg://postgres@127.0.0.1:5432/ablate
cluster-up: $(STAMP)
	@infra/local/cluster.sh up --workers 2
	@infra/local/mlflow.sh up
	@$(BIN)/ablate db upgrade --store $(CLUSTER_STORE) >&2
	@echo "export ABLATE_STORE=$(CLUSTER_STORE)"

cluster-down: $(STAMP)
	@rc=0; infra/local/mlflow.sh down || rc=1; infra/local/cluster.sh down || rc=1; exit $$rc

cluster-status: $(STAMP)
	@rc=0; infra/local/cluster.sh status || rc=$$?; infra/local/mlflow.sh status || rc=$$?; exit $$rc

# 4 trials at 0.25 GPU on one NVIDIA GPU: img/s, peak GPU memory, GPU busy share (exit 3 without a GPU)
GPU_CHECK_OUT ?= runs/gpu-check.json
gpu-check: $(STAMP)
	ABLATE_PYTHON=$(BIN)/python bash infra/gpu-check.sh --out $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
