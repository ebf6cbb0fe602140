# `make run`: set everything up on a fresh machine and run the main job.
# `make test`: set up the same way and run the whole test suite.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.densekit-installed
# The pinned pair lies on local disk here; an unpinned torch would download a CUDA build of several GB.
TORCH  := torch==2.14.1 torchvision==0.29.1
FASHION_MNIST ?= /usr/share/datasets/fashion-mnist
# The main job: DenseNet-BC (L=40, k=12) with a stride-2 stem, fast recipe, on Fashion-MNIST;
# sized to train and evaluate in minutes on 2 CPU cores (docs/performance.md#make-run).
TRAIN_ARGS ?= --model densenet_bc_40_k12_s2 --epochs 3
ifndef RUN_DIR
RUN_DIR := runs/make-run-$(shell date +%Y%m%d-%H%M%S)
endif

.PHONY: run test setup data models clean

run: setup data
	$(VENV)/bin/densekit train $(TRAIN_ARGS) --out $(RUN_DIR)
	$(VENV)/bin/densekit eval $(RUN_DIR)

test: setup data
	$(PY) -m pytest -q

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Fashion-MNIST from the Debian package dataset-fashion-mnist (IDX files); nothing is downloaded at run time.
data:
	@if [ -e $(FASHION_MNIST)/train-images-idx3-ubyte.gz ] || [ -e $(FASHION_MNIST)/train-images-idx3-ubyte ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing dataset-fashion-mnist"; \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist', or set DENSEKIT_DATA to a folder holding the IDX files"; \
	fi

models: setup
	$(VENV)/bin/densekit models

clean:
	rm -rf $(VENV) .pytest_cache
