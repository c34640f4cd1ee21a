# dip-train: two commands do all set-up on a fresh machine.
#   make quickstart   create .venv, install (pinned), run the main job end to end on the embedded default
#   make test         install if needed, run the whole test suite (CPU)
#   make ablation     DiP-T/16 vs its linear-head ablation on Fashion-MNIST (apt-get install dataset-fashion-mnist)
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-stamp
# Test-time environment: DeepSpeed on CPU, fast Ray Train reports, no network.
export DS_ACCELERATOR ?= cpu
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S ?= 0.1
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1
# Python caches each module's bytecode (.pyc) on first import: the install skips the up-front pass
# (--no-compile, below), so a machine that sets PYTHONDONTWRITEBYTECODE (this one did) would compile torch,
# DeepSpeed, MLflow and Ray from source again in every process: ~20 s of CPU for each Ray worker, driver
# and actor (benchmarks/RESULTS.md, ## Test suite). Unset, the first import writes the cache for all others.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install quickstart test test-fast bench ablation clean

install: $(STAMP)

# torch + torchvision first, in one call, pinned, so nothing pulls another build (stack notes).
# --no-compile: no .pyc for the ~20k files of the stack up front (a minute of CPU on 2 cores);
# Python compiles the modules a run imports, once, on first import. The last line imports the heavy
# stack once, writing its bytecode cache (see PYTHONDONTWRITEBYTECODE above): the first Ray cluster's
# processes start from it instead of all compiling the same modules at once.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --no-compile torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q --no-compile -e '.[test]'
	$(BIN)/python -c "import torch, deepspeed, mlflow, streaming, ray.train, ray.dashboard.agent"
	touch $(STAMP)

quickstart: install
	$(BIN)/dip train configs/quickstart_cpu.yaml
	$(BIN)/python benchmarks/grid_classes.py runs/quickstart/samples/final.png

# two xdist workers, a file at a time (--dist loadfile), longest files first; tests/conftest.py makes the
# multi-node files (tests/test_multinode_*.py) one work unit, so two multi-node Ray clusters never run at once;
# the 25 slowest tests are listed at the end (where the suite's minutes go)
test: install
	$(BIN)/python -m pytest -q -ra --durations=25 --timeout=900 -n 2 --dist loadfile --no-loadscope-reorder tests

test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not slow" tests

bench: install
	$(BIN)/python benchmarks/model.py
	$(BIN)/python benchmarks/data.py
	$(BIN)/python benchmarks/trainer.py
	$(BIN)/python benchmarks/eval.py

# ~35 min on a busy 2-core CPU, plus ~20 min to build the data and FID reference on the first call; niced
# so that interactive work on the machine keeps its cores (benchmarks/RESULTS.md, ## Ablation)
ablation: install
	nice -n 15 $(BIN)/python benchmarks/ablation.py

clean:
	rm -rf runs quickstart_out .pytest_cache
