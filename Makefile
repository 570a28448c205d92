# Two commands for a fresh machine: `make demo` (install + train/evaluate on Fashion-MNIST) and `make test`.
PYTHON ?= python3
PIP_INSTALL = $(PYTHON) -m pip install -q -c constraints.txt

.PHONY: install data lint test demo mutation bench chaos gpu-check cpu-check gpu-check-files

install:
	$(PIP_INSTALL) -e ".[test]"

# Real Fashion-MNIST IDX files from Debian; skipped quietly where apt is unavailable (the demo then downloads).
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) || \
		echo "note: could not install dataset-fashion-mnist; tests on the real files will be skipped"; \
	fi

# Lint and import order (ruff, configured in pyproject.toml; the line length is 120).
lint: install
	$(PYTHON) -m ruff check .

# One OpenMP thread per process: the suite starts several processes (gloo DDP, submitit tasks) on small machines.
test: install data lint
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

# What a GPU machine must show, in two device calls of at most 6 minutes each (STAGE=1, then STAGE=2; no install: the
# device image brings torch, torchvision, timm): the compiled bf16 step against eager fp32, the GPU tests, a 224/96
# vit_small_sparo run with every GPU default stopped by SIGTERM and resumed, the same in fp16, step and data img/s at
# the official shape, a corrupt image. One table in benchmarks/results/ (or OUTPUT), exit 1 if a part failed, ran out
# of time or ran no compiled graph. Without CUDA only the tiny compiled-step runs. Commands: docs/gpus.md.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py $(if $(STAGE),--stage $(STAGE)) $(if $(OUTPUT),--output $(OUTPUT))

# The CPU half of the GPU path (never in a loan): torch.compile(DDP(student)) on 2 gloo processes and the GPU path's
# flags at tiny size on the CPU, stopped by SIGTERM and resumed.
cpu-check:
	$(PYTHON) benchmarks/gpu_check.py --stage cpu

# Files the device machine lacks, into the ignored folder its runs carry (`carry: [".gpu_data"]`): the Fashion-MNIST
# IDX files, for `make bench`'s Fashion-MNIST GPU profile.
gpu-check-files: data
	mkdir -p .gpu_data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/* .gpu_data/fashion-mnist/
