# Set-up installs torch 2.13.0 first: a bare "torch" requirement resolved with nothing installed
# pulls a multi-GB CUDA build. Which build "torch==2.13.0" gets depends on pip's configuration:
# the development machines keep the CPU wheel in a local folder that pip searches. Elsewhere,
# TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU build from PyTorch's index.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=

.PHONY: setup test demo lint openapi clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

# Extra options for `layerbank demo`, e.g. DEMO_ARGS="--url http://127.0.0.1:8731".
DEMO_ARGS ?=

demo: setup
	$(VENV)/bin/layerbank demo $(DEMO_ARGS)

lint: setup
	$(VENV)/bin/ruff check store workers service tests bench
	$(VENV)/bin/ruff format --check store workers service tests bench
	$(VENV)/bin/mypy store service

openapi: setup
	$(PY) -m service.openapi > openapi.yaml

clean:
	rm -rf $(VENV) .pytest_cache
