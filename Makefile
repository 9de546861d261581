# Quick start: `make demo` and `make test` each create .venv when it is missing and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines must get exactly this torch (a local CPU wheel); GPU users may override, e.g. TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.finepruner-installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]" --config-settings editable_mode=compat
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/finepruner demo

lint: $(STAMP)
	$(BIN)/ruff check finepruner tests benchmarks

test: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) build *.egg-info
