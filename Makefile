# glsd — the two commands that matter: `make demo` and `make test`. Both set up .venv from nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_OUT := runs
# Passive OpenMP waiting: spinning threads starve the data workers on small CPUs (glsd_cli/__init__.py).
export OMP_WAIT_POLICY := PASSIVE

.PHONY: venv demo test test-slow test-all wheel-check bench bench-lowdata bench-sdssl bench-dense clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch and torchvision first: on this project's machines pip takes the local 2.14.1 / 0.29.1 builds.
	$(BIN)/pip install --quiet torch torchvision
	$(BIN)/pip install --quiet -e '.[dev,onnx]'
	touch $(STAMP)

venv: $(STAMP)

## Pre-train the tiny preset on the built-in data, then k-NN: pre-trained vs. the same network at random init.
demo: $(STAMP)
	rm -rf $(DEMO_OUT)/demo
	$(BIN)/glsd pretrain --name demo --out $(DEMO_OUT)
	$(BIN)/glsd knn-eval $(DEMO_OUT)/demo --random-init
	$(BIN)/glsd knn-eval $(DEMO_OUT)/demo

## The fast suite (what CI runs first).
test: $(STAMP)
	$(BIN)/python -m pytest -q

## Only the slow end-to-end runs (marked @pytest.mark.slow).
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

## Everything, including the slow end-to-end runs.
test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

## The built wheel in a fresh environment outside the checkout: --version, presets, pretrain, knn-eval, export.
wheel-check:
	.ci/wheel_check

## Speed benchmarks: each prints figures and writes bench/results/*.json (not timed tests).
bench: $(STAMP)
	$(BIN)/python bench/local_overhead.py --preset tiny-geo
	$(BIN)/python bench/train_precision.py
	$(BIN)/python bench/linear_eval_speed.py
	$(BIN)/python bench/sd_cost.py
	$(BIN)/python bench/omp_wait_policy.py
	$(BIN)/python bench/step_bound.py
	$(BIN)/python bench/local_loss_chunks.py
	$(BIN)/python bench/data_pipeline.py
	$(BIN)/python bench/knn_speed.py
	$(BIN)/python bench/target_gather.py
	$(BIN)/python bench/end_to_end.py

## The low-data comparison on Fashion-MNIST (installs the Debian package with the IDX files if missing).
bench-lowdata: $(STAMP)
	test -d /usr/share/datasets/fashion-mnist || (apt-get update && apt-get install -y dataset-fashion-mnist)
	$(BIN)/python bench/lowdata.py

## SDSSL per block: SimCLR, BYOL, MoCo v3 and GLSD without and with SD on the same set, 3 seeds, k-NN and
## linear per block (bench/results/sdssl_layers.{md,json,png}; ~56 min on 2 shared cores, so niced).
bench-sdssl: $(STAMP)
	test -d /usr/share/datasets/fashion-mnist || (apt-get update && apt-get install -y dataset-fashion-mnist)
	nice -n 10 $(BIN)/python bench/sdssl_layers.py

## GLSD's local loss by dense evaluation on the built-in scenes: DINO, similarity and geometric matching,
## 3 seeds each (bench/dense_arms.py; bench/results/dense_arms.{md,json}).
bench-dense: $(STAMP)
	nice -n 10 $(BIN)/python bench/dense_arms.py

clean:
	rm -rf $(VENV) runs .pytest_cache build dist
