# apq-lightning: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
# Data beside the project (never hard-coded in the library): override on the command line.
SHARED ?= ../shared
export APQ_CIFAR_ARCHIVE ?= $(abspath $(SHARED))/data/cifar10-jpeg.tar.gz
export WANDB_MODE ?= offline

.PHONY: install test test-fast lint demo pipeline supernet bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --timeout=900 tests

# The edit loop: no training-heavy, multi-process or CIFAR-10 tests.
test-fast: $(STAMP)
	$(PY) -m pytest -q --timeout=300 -m "not slow and not shared" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# All seven stages on the tiny space and scikit-learn's digits (offline, minutes): supernet,
# FP samples, FP predictor, MP samples, MP predictor (transferred), search under two BitFusion
# latency budgets, QAT finetune of the winners, baselines; ends with the results table.
demo: $(STAMP)
	$(PY) -m apq_lightning.stages --preset tiny

# The same on CIFAR-10 with apq_cifar (CPU hours; rerun to resume): make pipeline DATA=path/to/cifar10-jpeg.tar.gz
# SUPERNET=weights/apq_cifar_supernet.pt QFA_SUPERNET=weights/apq_cifar_qfa_supernet.pt starts at stage 2 from
# the shipped supernets (float: FP samples and finetunes; quantized-for-all: the MP samples).
DATA ?= $(APQ_CIFAR_ARCHIVE)
SUPERNET ?=
QFA_SUPERNET ?=
pipeline: $(STAMP)
	$(PY) -m apq_lightning.stages --preset cifar --data $(DATA) $(if $(SUPERNET),--supernet $(SUPERNET)) \
		$(if $(QFA_SUPERNET),--qfa-supernet $(QFA_SUPERNET))

supernet: $(STAMP)
	$(PY) -m apq_lightning.cli fit --config recipes/supernet_cifar.yaml --data.root $(APQ_CIFAR_ARCHIVE) --ckpt_path last

bench: $(STAMP)
	$(PY) benchmarks/supernet_step.py
	$(PY) benchmarks/qat_step.py
	$(PY) benchmarks/cost_eval.py
	$(PY) benchmarks/fake_quant_speed.py

clean:
	rm -rf $(VENV) .pytest_cache lightning_logs wandb
