# Every target creates .venv on first use; nothing relies on packages installed by hand.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONSTRAINTS ?= constraints.txt
PIP_INSTALL := $(BIN)/python -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
ifndef DEMO_DIR
DEMO_DIR := outputs/demo/$(shell date +%Y%m%d-%H%M%S)
endif
PYTEST_ARGS ?=

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: $(BIN)/python setup.cfg pyproject.toml $(CONSTRAINTS)
	$(PIP_INSTALL) -e .
	touch $@

# The timm extra is installed so that timm:NAME backbones are tested.
# The sweep and slurm extras let the Optuna sweep and SLURM preset tests run (tests/test_sweep.py).
# The transformers extra is the reference Mask2Former for tests/test_mask2former_transformers.py.
# lvis (the LVISEval reference for tests) pins nothing usable: installed without its deps
# (opencv, matplotlib), which the tests stub out. panopticapi-lite (pq_compute, the PQ reference)
# likewise: its evaluation module needs only numpy and PIL.
$(VENV)/.dev: $(VENV)/.runtime
	$(PIP_INSTALL) -e '.[dev,bench,sweep,slurm,timm,transformers,export]'
	$(BIN)/python -m pip install --quiet --no-deps lvis==0.5.3
	$(BIN)/python -m pip install --quiet --no-deps panopticapi-lite==0.2.0
	touch $@

# Train the demo U-Net recipe (experiment=synthetic_unet) on synthetic shapes, then evaluate its
# checkpoint as a user would.
demo: $(VENV)/.runtime
	$(BIN)/segtrain train experiment=synthetic_unet hydra.run.dir=$(DEMO_DIR)
	$(BIN)/segtrain eval ckpt=$(DEMO_DIR)/checkpoints/last.pt output=$(DEMO_DIR)/eval_metrics.json

# pytest exit status 5 means it collected no test: treated as a failure, never as a pass.
test: $(VENV)/.dev
	$(BIN)/python -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

lint: $(VENV)/.dev
	$(BIN)/ruff check .

bench: $(VENV)/.dev
	$(BIN)/python bench/train_overhead.py
	$(BIN)/python bench/semantic_metric.py
	$(BIN)/python bench/instance_loader.py
	$(BIN)/python bench/coco_eval.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
