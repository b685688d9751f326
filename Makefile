# Set-up and main commands. `make run` and `make test` each create the venv on first use.
# torch is pinned to the CPU build that installs from this machine's disk; a CUDA user
# installs their own torch build into the venv first (see README).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PY := $(VENV)/bin/python

.PHONY: venv data run test test-all bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,plot,search,data,hf,lightning]" "$(TORCH)"
	touch $@

data: $(FMNIST)

$(FMNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

# The main job: LeNet-300-100 on Fashion-MNIST at density 0.02 with RigL (a few minutes on 2 cores).
run: venv data
	$(VENV)/bin/sparsegrow train configs/fmnist_lenet.yaml --run-dir runs/default $(ARGS)

test: venv data
	$(PY) -m pytest -q

test-all: venv data
	$(PY) -m pytest -q -m ""

clean:
	rm -rf $(VENV) runs .pytest_cache
