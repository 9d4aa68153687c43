# apq-lightning: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
# Data beside the project (never hard-coded in the library): override on the command line.
SHARED ?= ../shared
export APQ_CIFAR_ARCHIVE ?= $(abspath $(SHARED))/data/cifar10-jpeg.tar.gz
export WANDB_MODE ?= offline

.PHONY: install test test-fast lint demo supernet bench clean

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

# The pipeline so far on the tiny space and digits (offline): supernet (stage 1), then its
# largest subnet with 4-bit weights / 8-bit activations, calibrated and finetuned with QAT
# (stage 7), and that subnet's latency / energy / BitOps on BitFusion (fitted model).
DEMO_SUBNET = runs/demo_subnet.json
demo: $(STAMP)
	$(PY) -m apq_lightning.cli fit --config recipes/supernet_tiny.yaml --ckpt_path last
	$(PY) -c "from apq_lightning.space import get_space as g; s = g('tiny'); \
		print(s.largest().with_bits(s.uniform_policy((4, 8, 4, 8))).to_json())" > $(DEMO_SUBNET)
	rm -rf runs/finetune_tiny  # its recipe resumes from last.ckpt, which may hold another subnet
	$(PY) -m apq_lightning.cli fit --config recipes/finetune_tiny.yaml --model.policy null \
		--model.subnet $(DEMO_SUBNET) --model.supernet_ckpt runs/supernet_tiny/checkpoints/last.ckpt
	$(PY) -m apq_lightning.cli cost --hardware bitfusion --subnet $(DEMO_SUBNET)

supernet: $(STAMP)
	$(PY) -m apq_lightning.cli fit --config recipes/supernet_cifar.yaml --data.root $(APQ_CIFAR_ARCHIVE) --ckpt_path last

bench: $(STAMP)
	$(PY) benchmarks/supernet_step.py
	$(PY) benchmarks/qat_step.py
	$(PY) benchmarks/cost_eval.py

clean:
	rm -rf $(VENV) .pytest_cache lightning_logs wandb
