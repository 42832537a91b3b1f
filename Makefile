# rlhf — every target sets itself up: a .venv in the repo, CPU torch 2.13.0 unless a torch is already present.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
CONFIG  ?=
RECIPE  ?= configs/tiny
STAMP   := $(VENV)/.installed

.PHONY: install test test-fast lint format demo world pretrain sft rm dpo ppo eval pipeline plot bench bench-peer overopt kl-control algorithms config-docs clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# Never let pip resolve an unpinned torch (a multi-GB CUDA build on a CPU box): keep the one present,
	@# or take the CPU wheel 2.13.0. GPU users: install the CUDA torch of your choice into .venv first.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,plot]"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

world: install
	$(BIN)/rlhf tiny --out runs/tiny/world

demo: install
	$(BIN)/python scripts/demo.py

pretrain: install
	$(BIN)/rlhf sft --config $(or $(CONFIG),configs/tiny/pretrain.yaml)

sft: install
	$(BIN)/rlhf sft --config $(or $(CONFIG),configs/tiny/sft.yaml)

rm: install
	$(BIN)/rlhf rm --config $(or $(CONFIG),configs/tiny/rm.yaml)

dpo: install
	$(BIN)/rlhf dpo --config $(or $(CONFIG),configs/tiny/dpo.yaml)

ppo: install
	$(BIN)/rlhf ppo --config $(or $(CONFIG),configs/tiny/ppo.yaml)

eval: install
	$(BIN)/rlhf eval --config $(or $(CONFIG),configs/tiny/eval.yaml)

pipeline: install
	$(BIN)/rlhf pipeline --config-dir $(RECIPE)

plot: install
	$(BIN)/rlhf plot runs/tiny

# docs/config.md from the config dataclasses' field docstrings (tests/test_config_docs.py fails when it is stale)
config-docs: install
	$(BIN)/python -m rlhf.config.docs > docs/config.md

bench: install
	$(BIN)/python scripts/bench.py

# rlhf vs TRL side by side; TRL lives only in .venv-peer (built by the script). ARGS="--quick", "--out runs/bench-peer.md", ...
# ARGS="--size small --sides rlhf": the 25.9M Llama, 256-token context, rlhf only; "--precision bf16": bf16 autocast.
bench-peer: install
	$(BIN)/python scripts/bench_peer.py $(ARGS)

overopt: install
	$(BIN)/python scripts/overoptimization.py

kl-control: install
	$(BIN)/python scripts/kl_control.py

algorithms: install
	$(BIN)/python scripts/algorithms.py

clean:
	rm -rf runs
