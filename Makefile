# The README's commands. `make bench`: set up and run the main job; `make test`: set up and run the tests.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
SOURCES := setup.py pyproject.toml meprop/opdefs.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/*)

.PHONY: setup bench test clean
setup: $(VENV)/.built

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)" numpy pytest hypothesis ninja pybind11 setuptools wheel tqdm matplotlib triton transformers datasets
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(BIN)/pip install -q -e . --no-build-isolation
	touch $@

bench: setup
	$(BIN)/python benchmarks/speed.py $(ARGS)

test: setup
	$(BIN)/python -m pytest $(ARGS)

clean:
	rm -rf build $(VENV) meprop/*.so *.egg-info
