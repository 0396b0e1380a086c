PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test test-unit image image-mlflow clean

install:  ## create .venv, install gnr (editable) with dev extras, and the pinned helm 3 into .venv/bin
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/python tools/helm_binary.py $(BIN) helm

test:  ## the whole suite (unit + integration)
	$(BIN)/pytest -q

test-unit:
	$(BIN)/pytest -q tests/unit

image:  ## container image for the cluster
	docker build -t gnr:$$($(BIN)/python -c 'import gnr; print(gnr.__version__)') .

image-mlflow:  ## MLflow tracking server image for k8s/
	docker build --target mlflow-server -t gnr-mlflow:$$($(BIN)/python -c 'import gnr; print(gnr.__version__)') .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
