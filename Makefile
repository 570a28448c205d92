# Two commands for a fresh machine: `make demo` (install + train/evaluate on Fashion-MNIST) and `make test`.
PYTHON ?= python3
PIP_INSTALL = $(PYTHON) -m pip install -q -c constraints.txt

.PHONY: install data test demo mutation bench chaos gpu-check gpu-check-files

install:
	$(PIP_INSTALL) -e ".[test]"

# Real Fashion-MNIST IDX files from Debian; skipped quietly where apt is unavailable (the demo then downloads).
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) || \
		echo "note: could not install dataset-fashion-mnist; tests on the real files will be skipped"; \
	fi

# One OpenMP thread per process: the suite starts several processes (gloo DDP, submitit tasks) on small machines.
test: install data
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q tests

# Every benchmark at the size that fits the machine (GPU: the official recipe's shape, 2x224 + 10x96 crops, 64 per GPU; CPU: small sizes), one Markdown table
# with the machine's facts in benchmarks/results/.
bench: install
	$(PYTHON) benchmarks/report.py

# Train vit_tiny_sparo on Fashion-MNIST and report its 20-NN accuracy next to the same network at random init and raw
# pixels (2-core CPU, fresh clone: 3.5 min of train + eval on 2026-12-06, 7.2-7.4 min earlier; docs/demo_recipes.md).
demo: install data
	$(PYTHON) -m experiments.demo

# Curated mutation check (not part of `make test`/CI): every bug in tests/mutation/mutations.py must fail its tests.
mutation: install data
	OMP_NUM_THREADS=1 $(PYTHON) tests/mutation/run.py

# The full chaos loop (not in `make test`/CI, which runs its first 2 kills): 5 SIGKILLs of ranks and of the whole
# torchrun job on 2 gloo processes, then the run must equal an uninterrupted one bit for bit.
chaos: install data
	CHAOS_KILLS=5 OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -s tests/test_chaos.py -k kills

# What a GPU machine must show, in at most 8 minutes (no install: the device image brings torch, torchvision, timm):
# GPU-only tests, a 224/96 vit_small_sparo run with every GPU default stopped by SIGTERM and resumed, a short
# Fashion-MNIST GPU profile and `make bench`; one table in benchmarks/results/, exit 1 if a part failed. Without CUDA
# the GPU parts say "skipped: no GPU" and the CPU half runs (compiled DDP on gloo, the GPU path's flags on the CPU).
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py

# Files the device machine lacks, into ignored folders that its runs carry: the Fashion-MNIST IDX files.
gpu-check-files: data
	mkdir -p .gpu_data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/* .gpu_data/fashion-mnist/
