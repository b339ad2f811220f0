# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment it needs. torch/torchvision are pinned to the builds this
# project is tested with (on x86_64 PyPI's torchvision needs the CUDA torch build; it runs on CPU).
PYTHON ?= python3
VENV ?= .venv
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
STAMP := $(VENV)/.xsel-installed

.PHONY: demo test bench lint clean labelstudio-check

$(STAMP): pyproject.toml plugins/xsel-efficientnet-lite/pyproject.toml plugins/xsel-torchxrayvision/pyproject.toml \
		plugins/xsel-timm/pyproject.toml plugins/xsel-rad-dino/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_PINS) -e ".[train,cpu,dev,ray]"
	$(BIN)/python -m pip install --quiet ./plugins/xsel-efficientnet-lite  # the example plugin, as a user would
	$(BIN)/python -m pip install --quiet $(TORCH_PINS) ./plugins/xsel-torchxrayvision ./plugins/xsel-timm \
		./plugins/xsel-rad-dino  # the field's encoders (torchxrayvision, timm, RAD-DINO via transformers)
	touch $@

demo: $(STAMP)
	$(BIN)/xsel demo --out demo-output --encoder efficientnet-lite0

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)  ## speed benchmarks → BENCHMARKS.md (about 30 minutes: the million-image selection is a third of it)
	$(BIN)/python bench/run_all.py

labelstudio-check: $(STAMP)  ## installs Label Studio into .venv-ls (~2.5 min once), imports an export into it
	$(BIN)/python bench/check_label_studio.py --install

lint: $(STAMP)
	$(BIN)/ruff check xsel plugins tests bench
	$(BIN)/ruff format --check xsel plugins tests bench

clean:
	rm -rf $(VENV) .venv-ls demo-output build dist *.egg-info
