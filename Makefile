# One set-up step shared by every target: a virtual environment in .venv with the pinned stack,
# then this project built in place. Each step leaves a stamp, so a second run skips what is done.
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
PIP    := $(VPY) -m pip

# Pinned stack (see README): mmdet 3.3.0 refuses mmcv >= 2.2, and mmcv 2.1.0 has no wheel for
# torch 2.13, so it is built from source against the installed torch (about 6 minutes on 2 cores).
TORCH_VERSION    := 2.13.0
MMCV_VERSION     := 2.1.0
MMENGINE_VERSION := 0.10.7
MMDET_VERSION    := 3.3.0

EXT_SOURCES := setup.py $(shell find dk_ops/csrc -type f 2>/dev/null)

.PHONY: env build test demo compare bench cuda-check clean

env: $(VENV)/.stack-installed

$(VENV)/.stack-installed:
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install "torch==$(TORCH_VERSION)" numpy
	# mmcv's setup.py imports pkg_resources (gone from setuptools >= 70 builds we can rely on) and
	# must see torch to build its ops, hence the old setuptools and no build isolation.
	$(PIP) install "setuptools<70" wheel ninja psutil
	$(PIP) install --no-build-isolation "mmcv==$(MMCV_VERSION)"
	$(PIP) install "mmengine==$(MMENGINE_VERSION)" "mmdet==$(MMDET_VERSION)" pycocotools pytest
	touch $@

build: $(VENV)/.dk-built

# Editable install: `import dk_ops` / `import dk_mmdet` work from anywhere, and the extension is
# rebuilt whenever a C++ source or setup.py changes.
$(VENV)/.dk-built: $(VENV)/.stack-installed $(EXT_SOURCES)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

test: build
	$(VPY) -m pytest -q tests

clean:
	rm -rf build dk_ops/_C*.so *.egg-info $(VENV)/.dk-built
