# Quick start: `make demo` and `make test` each create .venv when it is missing and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines must get exactly this torch (a local CPU wheel); GPU users may override, e.g. TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.finepruner-installed
# lmms-eval for the plugin and its tests (tests/test_lmms_*.py): the release the plugin is written for, without
# its dependencies (its torchvision does not import beside the CPU torch), then what its command line imports
# (constraints/lmms-cpu.txt), with the torch already in $(VENV) pinned. pip then reports lmms-eval's other
# requirements (torchvision, wandb, ...) as not installed: expected, the plugin's tasks do not import them.
LMMS_EVAL_SPEC ?= lmms-eval==0.7.3
LMMS_STAMP := $(VENV)/.finepruner-lmms-installed

.PHONY: demo test lint install lmms clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]" --config-settings editable_mode=compat
	touch $(STAMP)

install: $(STAMP)

$(LMMS_STAMP): $(STAMP) constraints/lmms-cpu.txt
	$(BIN)/python -m pip install -q --no-deps "$(LMMS_EVAL_SPEC)"
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-pin.txt
	$(BIN)/python -m pip install -q -r constraints/lmms-cpu.txt -c $(VENV)/torch-pin.txt
	touch $(LMMS_STAMP)

lmms: $(LMMS_STAMP)

demo: $(STAMP)
	$(BIN)/finepruner demo

lint: $(STAMP)
	$(BIN)/ruff check finepruner tests benchmarks

test: lint lmms
	$(BIN)/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) build *.egg-info
