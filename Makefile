# Two commands do all the set-up on a fresh machine:  make demo  /  make test
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: venv demo test test-all bench throughput ui clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# The project directory holds the demo's MLflow store (mlruns/, gitignored) for `make demo` and
# `make ui`; outside make the store defaults to ~/.local/share/anomaly-vae (README: Where the store is).
STORE_URI = $${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlruns/mlflow.db}

demo: $(STAMP)
	ANOMALY_VAE_HOME="$(CURDIR)" PATH="$(abspath $(BIN)):$$PATH" $(BIN)/anomaly-vae demo

test: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/quality.py

throughput: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/throughput.py

ui: $(STAMP)
	mkdir -p mlruns
	ANOMALY_VAE_HOME="$(CURDIR)" $(BIN)/mlflow ui --backend-store-uri "$(STORE_URI)" --host 127.0.0.1 --port 5000

clean:
	rm -rf build dist *.egg-info .pytest_cache
