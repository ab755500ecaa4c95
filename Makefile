# Run `make help` for the list of targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On x86_64 these releases install from local wheels; elsewhere pip picks the newest torch for the platform.
ifeq ($(shell uname -m),x86_64)
TORCH ?= torch==2.14.1 torchvision==0.29.1
else
TORCH ?= torch torchvision
endif
# Seconds and a random suffix: two runs started in the same second get their own run directories.
RUN_STAMP := $(shell date +%Y%m%d-%H%M%S)-$(shell od -An -N3 -tx1 /dev/urandom | tr -d ' \n')

.PHONY: help install quickstart eval-quickstart starter test test-all notebooks lint clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-16s %s\n", $$1, $$2}'

install: $(VENV)/.installed ## create .venv with torch and this package (editable, with the dev extra)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	# Meta's DINOv2 model code, a test oracle for key conversion; its metadata pins torch 2.0, hence --no-deps.
	$(BIN)/python -m pip install -q --no-deps dinov2==0.0.1.dev2
	touch $@

# The quickstart's tensors are small: one intra-op thread per process avoids oversubscribing a laptop's cores
# (measured several times faster than two threads on a busy 2-core machine). Override with OMP_NUM_THREADS=N.
quickstart: install ## post-train a small ViT with NeCo on synthetic scenes (CPU, a few minutes) and evaluate it
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m neco.train experiment=quickstart run_name=quickstart-$(RUN_STAMP)

# Both the starter and the post-trained checkpoint, with the same protocols, then one table and one figure.
# QUICKSTART_CKPT=<path> picks another checkpoint than the newest quickstart run's.
QUICKSTART_CKPT ?=
eval-quickstart: install ## evaluate the starter and the newest quickstart run (overclustering, Hummingbird, linear) and compare them (CPU, ~5 min)
	@ck="$(QUICKSTART_CKPT)"; [ -n "$$ck" ] || ck=$$(ls -t outputs/runs/quickstart*/checkpoints/last.pt 2>/dev/null | head -n 1); \
	if [ -z "$$ck" ]; then echo "no quickstart run in outputs/runs/: run make quickstart first"; exit 2; fi; \
	out=outputs/eval/quickstart_comparison/$(RUN_STAMP); \
	protocols="eval=[overcluster,hummingbird,linear]"; \
	echo "1/2 the starter checkpoint (neco/assets/vit_tiny_synthetic.pt)"; \
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/python -m neco.eval experiment=quickstart data=synthetic \
		"$$protocols" hydra.run.dir=$$out/starter || exit $$?; \
	echo "2/2 after NeCo: $$ck"; \
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/python -m neco.eval experiment=quickstart data=synthetic \
		"$$protocols" checkpoint=$$ck hydra.run.dir=$$out/after_neco || exit $$?; \
	$(BIN)/python -m neco.summary compare $$out/starter $$out/after_neco --labels starter "after NeCo" --out $$out

starter: install ## regenerate the quickstart's starting checkpoint (neco/assets/vit_tiny_synthetic.pt)
	$(BIN)/python -m neco.starter

test: install ## run the default test suite (CPU; no GPU, SLURM or multi-process tests)
	$(BIN)/python -m pytest -q --durations=15

test-all: install ## the default suite plus the slurm and ddp tests (needs launchers/local_slurm.sh start)
	$(BIN)/python -m pytest -q -m "slurm or ddp or not gpu"

notebooks: install ## execute notebooks/*.ipynb from the repository root; executed copies in outputs/notebooks/
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m neco.notebooks

lint: install ## ruff
	$(BIN)/ruff check neco tests launchers

clean: ## remove outputs of local runs (not the virtual environment)
	rm -rf outputs multirun .pytest_cache

.PHONY: bench bench-gpu
BENCH_ARGS ?= --out outputs/bench/bench_$(RUN_STAMP).jsonl

bench: install ## training-step speed and memory, floor, sorter, loader (GPU; BENCH_ARGS=--quick on a CPU)
	@mkdir -p outputs/bench
	$(BIN)/python -m neco.bench $(BENCH_ARGS)

bench-gpu: ## every GPU check in one ~6-minute run on a bare GPU machine (bench/README.md)
	bash bench/gpu_check.sh
