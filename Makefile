# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment it needs. torch/torchvision are pinned to the builds this
# project is tested with (on x86_64 PyPI's torchvision needs the CUDA torch build; it runs on CPU).
PYTHON ?= python3
VENV ?= .venv
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
STAMP := $(VENV)/.xsel-installed

.PHONY: demo test bench lint clean

$(STAMP): pyproject.toml plugins/xsel-efficientnet-lite/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_PINS) -e ".[train,cpu,dev,ray]"
	$(BIN)/python -m pip install --quiet ./plugins/xsel-efficientnet-lite  # the example plugin, as a user would
	touch $@

demo: $(STAMP)
	$(BIN)/xsel demo --out demo-output --encoder efficientnet-lite0

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)  ## speed benchmarks → BENCHMARKS.md (about 10 minutes)
	$(BIN)/python bench/run_all.py

lint: $(STAMP)
	$(BIN)/ruff check xsel plugins tests bench
	$(BIN)/ruff format --check xsel plugins tests bench

clean:
	rm -rf $(VENV) demo-output build dist *.egg-info
