PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The oldest supported versions (requirements-oldest.lock) are tested on Python 3.12, the GPU machine's:
# python3.12 on PATH, else pyenv's.
PY312 ?= $(firstword $(foreach p,python3.12 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12),\
                       $(if $(shell $(p) -c '' 2>/dev/null && echo ok),$(p))))
OLDEST ?= .venv-oldest

.PHONY: install test test-suite test-unit test-oldest lock lock-oldest image image-mlflow clean

install:  ## create .venv: gnr (editable) with dev extras at the locked versions, and the pinned helm 3 in .venv/bin
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c requirements.lock --upgrade pip
	$(BIN)/pip install -q -c requirements.lock -e '.[dev]'
	$(BIN)/python tools/helm_binary.py $(BIN) helm

test:  ## the whole suite at the locked versions and, beside it, the unit tests at the oldest supported ones
	@# Each pytest keeps to one thread (tests/conftest.py), so on 2 cores the two runs go side by side.
	@$(MAKE) --no-print-directory -j2 test-suite test-oldest

test-suite:  ## the whole suite (unit + integration) in .venv
	$(BIN)/pytest -q

test-unit:  ## the unit tests in .venv
	$(BIN)/pytest -q tests/unit

test-oldest: $(OLDEST)/.installed  ## the unit tests on Python 3.12 with torch 2.11.0 (CPU) and every other lower bound
	@echo "make: the unit tests on the oldest supported versions are running, log in $(OLDEST)-tests.log"
	@$(OLDEST)/bin/pytest -q -rfE -p no:cacheprovider tests/unit > $(OLDEST)-tests.log 2>&1; rc=$$?; \
	 echo "make test-oldest (Python 3.12, torch 2.11.0):"; grep -E '^(FAILED|ERROR) ' $(OLDEST)-tests.log; \
	 tail -n 1 $(OLDEST)-tests.log; exit $$rc

# torch 2.11.0 comes from PyPI (the only index reachable here), CUDA libraries included: about 3.3 GB,
# a few minutes to download. The venv is rebuilt when the lock or pyproject.toml changes.
$(OLDEST)/.installed: requirements-oldest.lock pyproject.toml
	@test -n "$(PY312)" || { echo "make: no Python 3.12 found; install one (pyenv install 3.12) or set PY312=/path/to/python3.12" >&2; exit 1; }
	@echo "make: building $(OLDEST) (Python 3.12, the oldest supported versions), log in $(OLDEST).log"
	@{ rm -rf $(OLDEST) && $(PY312) -m venv $(OLDEST) \
	   && $(OLDEST)/bin/pip install -q -c requirements-oldest.lock --upgrade pip \
	   && $(OLDEST)/bin/pip install -q -c requirements-oldest.lock -e . pytest; } > $(OLDEST).log 2>&1 \
	 || { grep -v '^WARNING: Location' $(OLDEST).log | tail -n 20 >&2; \
	      echo "make: could not build $(OLDEST) (whole log: $(OLDEST).log)" >&2; exit 1; }
	@touch $@
	@echo "make: $(OLDEST) ready"

lock:  ## rewrite requirements.lock: the newest releases within pyproject.toml's ranges, with every extra (Python 3.11)
	rm -rf build/lock && $(PY) -m venv build/lock
	build/lock/bin/pip install -q --upgrade pip
	build/lock/bin/pip install -q -e '.[dev,gcs,azure]'
	{ grep '^#' requirements.lock; build/lock/bin/pip freeze --all --exclude-editable | sort -f; } > build/requirements.lock
	mv build/requirements.lock requirements.lock

lock-oldest:  ## rewrite requirements-oldest.lock: pyproject.toml's lower bounds and pytest (Python 3.12)
	rm -rf build/lock-oldest && $(PY312) -m venv build/lock-oldest
	build/lock-oldest/bin/pip install -q --upgrade pip
	$(PY) tools/lower_bounds.py > build/lower-bounds.txt
	build/lock-oldest/bin/pip install -q -c build/lower-bounds.txt -e . pytest
	{ grep '^#' requirements-oldest.lock; build/lock-oldest/bin/pip freeze --all --exclude-editable | sort -f; } > build/requirements-oldest.lock
	mv build/requirements-oldest.lock requirements-oldest.lock

image:  ## container image for the cluster
	docker build -t gnr:$$($(BIN)/python -c 'import gnr; print(gnr.__version__)') .

image-mlflow:  ## MLflow tracking server image for k8s/
	docker build --target mlflow-server -t gnr-mlflow:$$($(BIN)/python -c 'import gnr; print(gnr.__version__)') .

clean:
	rm -rf $(VENV) $(OLDEST) $(OLDEST).log $(OLDEST)-tests.log build *.egg-info .pytest_cache
