# One set-up step shared by every target: a virtual environment in .venv with the pinned stack,
# then this project built in place. Each step leaves a stamp, so a second run skips what is done.
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
PIP    := $(VPY) -m pip

# Pinned stack (see README): mmdet 3.3.0 refuses mmcv >= 2.2, and mmcv 2.1.0 has no wheel for
# torch 2.13, so it is built from source against the installed torch, the longest step of the
# set-up (about 10.5 minutes in all on a fresh 2-core machine, most of it this compile; pip
# caches the mmcv wheel). Measured times: docs/development.md.
TORCH_VERSION    := 2.13.0
MMCV_VERSION     := 2.1.0
MMENGINE_VERSION := 0.10.7
MMDET_VERSION    := 3.3.0

# The lock: every package of .venv (CPU_LOCK) and of .venv-cuda (CUDA_LOCK), dependencies
# included, at the exact version the suite last passed with. Every pip call below installs under
# it as constraints, so a fresh machine gets the same environment; a lock that changes reinstalls
# the venv's packages. `make lock` resolves afresh and rewrites both files, only after the suite
# and the CUDA check pass in the new environments (docs/development.md#the-locked-environment).
CPU_LOCK  ?= requirements/cpu.lock
CUDA_LOCK ?= requirements/cuda.lock

EXT_SOURCES := setup.py $(shell find dk_ops/csrc -type f 2>/dev/null)

.PHONY: env build test test-asan test-isa demo demo-rtmdet compare compare-converged cuda-check \
	lock clean

env: $(VENV)/.stack-installed

# mmcv's setup.py imports pkg_resources and must see torch to build its ops, so it is built
# without build isolation under setuptools 69.5.1. Then setuptools moves to what torch 2.13 asks
# for (>= 77.0.3) and mmengine still imports at run time (pkg_resources, to find `mmdet::`
# configs; setuptools 81 removed it), so that `pip check` passes.
MMCV_BUILD_SETUPTOOLS := 69.5.1
RUNTIME_SETUPTOOLS    := setuptools>=77.0.3,<81

$(VENV)/.stack-installed: $(CPU_LOCK)
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c $(CPU_LOCK) "torch==$(TORCH_VERSION)" numpy wheel ninja psutil
	$(PIP) install "setuptools==$(MMCV_BUILD_SETUPTOOLS)"
	$(PIP) install -c $(CPU_LOCK) --no-build-isolation "mmcv==$(MMCV_VERSION)"
	$(PIP) install -c $(CPU_LOCK) "$(RUNTIME_SETUPTOOLS)" "mmengine==$(MMENGINE_VERSION)" \
		"mmdet==$(MMDET_VERSION)" pycocotools pytest scikit-learn "onnx==1.23.2" \
		"onnxscript==0.7.2" "onnxruntime==1.31.1"  # t-SNE, ONNX
	$(PIP) check
	touch $@

build: $(VENV)/.dk-built

# Editable install: `import dk_ops` / `import dk_mmdet` work from anywhere, and the extension is
# rebuilt whenever a C++ source or setup.py changes. DK_OPS_EMULATED_CUDA=1 adds the test suite's
# emulated CUDA extension, which a user's `pip install .` leaves out.
$(VENV)/.dk-built: $(VENV)/.stack-installed $(EXT_SOURCES)
	DK_OPS_EMULATED_CUDA=1 $(PIP) install --no-build-isolation --no-deps --use-pep517 -e .
	touch $@

test: build
	$(VPY) -m pytest -q tests

# The CUDA kernels on the CPU (the emulated build) under AddressSanitizer, so that their
# out-of-bounds accesses to global memory are reported: dk_ops and its emulated extension built
# with -fsanitize=address in $(ASAN_DIR) (the in-place build stays as it is), then the emulation's
# tests and the emulated op tests there, the sanitizer's runtime preloaded into Python (which is
# not built with it; its allocations, by design never freed, are not leaks to report), and
# libstdc++ with it, so that the runtime finds the C++ throw it intercepts when it starts. The
# threads of each block in random order and at most 3 blocks a launch: the other schedules run in
# `make test`. Its time: docs/development.md.
ASAN_DIR   := build/asan
ASAN_TESTS := tests/test_emulated_cuda.py tests/test_op_cuda_emulated.py \
              tests/test_op_cuda_implicit_gemm.py tests/test_op_zero_sizes.py

test-asan: env
	DK_OPS_EMULATED_CUDA=1 CFLAGS="-fsanitize=address -fno-omit-frame-pointer" LDFLAGS="-fsanitize=address" \
	MAX_JOBS=$${MAX_JOBS:-2} $(VPY) setup.py build --force --build-temp $(ASAN_DIR)/temp \
		--build-lib $(ASAN_DIR)/lib
	LD_PRELOAD="$$($${CXX:-g++} -print-file-name=libasan.so) $$($${CXX:-g++} -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0 \
	DK_EMULATED_CUDA_THREAD_ORDER=random DK_EMULATED_CUDA_MAX_BLOCKS=3 \
	PYTHONPATH=$(ASAN_DIR)/lib $(VPY) -P -m pytest -q -p no:cacheprovider -rs $(ASAN_TESTS)

# The CPU loops' vector clones (dk_ops/csrc/cpu/vector_clones.h): the loader runs only the widest
# one this CPU supports, so `make test` runs no other. Here the baseline and, where the CPU has
# AVX2, the AVX2 version are each built alone (DK_OPS_VECTOR_ISA) in $(ISA_DIR)/<isa>, and the CPU
# op tests run on them.
ISA_DIR   := build/isa
ISA_TESTS := tests/test_vector_isa.py tests/test_op_forward.py tests/test_op_backward.py \
             tests/test_op_depthwise.py tests/test_op_global_per_image.py
VECTOR_ISAS = x86-64 $(if $(shell grep -wm1 avx2 /proc/cpuinfo),x86-64-v3)

test-isa: env
	test "$$(uname -m)" = x86_64 || { echo "test-isa: the vector clones are x86-64 only"; exit 0; }; \
	for isa in $(VECTOR_ISAS); do \
		DK_OPS_VECTOR_ISA=$$isa DK_OPS_EMULATED_CUDA=1 MAX_JOBS=$${MAX_JOBS:-2} $(VPY) setup.py \
			build --force --build-temp $(ISA_DIR)/$$isa/temp --build-lib $(ISA_DIR)/$$isa/lib && \
		DK_OPS_VECTOR_ISA=$$isa PYTHONPATH=$(ISA_DIR)/$$isa/lib $(VPY) -P -m pytest -q \
			-p no:cacheprovider $(ISA_TESTS) || exit 1; \
	done

# The quickstart on the synthetic shapes data (configs/shapes): `make demo` trains and tests
# the local-DK Faster R-CNN and prints its COCO table, `make demo-rtmdet` the same for RTMDet-tiny
# with local DK in its depthwise convs; `make compare` runs the short-schedule seeded study of
# every variant (tools/run_study.py: fine-tuning from a rigid stage-1 model and from scratch,
# three seeds, val and the wider-deformation test_hard split; docs/shapes.md). All of them skip
# the steps that finished (delete the work_dir to start over) and resume an interrupted training.
SHAPES_DIR     := data/shapes
SHAPES_DATA    := $(SHAPES_DIR)/annotations/instances_test_hard.json
DEMO_CONFIG    := configs/shapes/faster-rcnn_r50-dk-c3-c5_fpn_shapes.py
DEMO_WORK_DIR  := work_dirs/demo/faster-rcnn_r50-dk-c3-c5_fpn_shapes

$(SHAPES_DATA): tools/data/make_shapes.py | build
	$(VPY) tools/data/make_shapes.py --out $(SHAPES_DIR) --num-train 400 --num-val 100 \
		--num-hard 100

demo-rtmdet: DEMO_CONFIG   := configs/shapes/rtmdet_tiny-dk-dw_shapes.py
demo-rtmdet: DEMO_WORK_DIR := work_dirs/demo/rtmdet_tiny-dk-dw_shapes

demo demo-rtmdet: build $(SHAPES_DATA)
	test -f $(DEMO_WORK_DIR)/.trained || { $(VPY) tools/train.py $(DEMO_CONFIG) \
		--work-dir $(DEMO_WORK_DIR) --resume && touch $(DEMO_WORK_DIR)/.trained; }
	$(VPY) tools/test.py $(DEMO_CONFIG) \
		"$$(cat $(DEMO_WORK_DIR)/last_checkpoint)" --work-dir $(DEMO_WORK_DIR)
	$(VPY) tools/analysis_tools/collect_results.py $(DEMO_WORK_DIR) \
		--out $(DEMO_WORK_DIR)/results.md --csv $(DEMO_WORK_DIR)/results.csv

compare: build $(SHAPES_DATA)
	$(VPY) tools/run_study.py --study short

# The study at convergence: several days of a 2-core machine (docs/shapes.md), so it runs
# nice'd; stop it with Ctrl-C or kill and run it again to resume.
SHAPES_LARGE_DIR  := data/shapes_large
SHAPES_LARGE_DATA := $(SHAPES_LARGE_DIR)/annotations/instances_test_hard.json

$(SHAPES_LARGE_DATA): tools/data/make_shapes.py | build
	$(VPY) tools/data/make_shapes.py --out $(SHAPES_LARGE_DIR) --num-train 2000 --num-val 500 \
		--num-hard 500

compare-converged: build $(SHAPES_LARGE_DATA)
	nice -n 10 $(VPY) tools/run_study.py --study converged

# Compile check of the CUDA kernels on machines without a GPU: builds the extension with nvcc
# for CUDA_ARCHS against a CUDA build of torch in its own venv (the math-library headers
# that ATen's CUDA headers include come from its nvidia wheels; /usr/local/cuda has only the
# compiler), in build/cuda-check so the CPU build stays as it is, prints every kernel's
# registers, spills, stack frame and shared memory for sm_90 from ptxas's report and fails if
# a hot kernel spills or keeps an array in local memory (tools/analysis_tools/cuda_resources.py),
# then loads the library and checks that the CUDA kernels are registered. That venv also runs
# the GPU benchmark's test on the CPU (tests/test_benchmark_backbone.py): torchvision's wheels
# are CUDA builds, which import only beside a CUDA build of torch, and the CPU venv cannot have
# them. Its torch brings Triton: the fused path's Triton kernels run on the CPU in Triton's
# interpreter (tests/test_op_fused.py) and are compiled for sm_90 for their resource table
# (tools/analysis_tools/triton_resources.py, which fails on spills).
# `make cuda-check CUDA_ARCHS=9.0` builds sm_90 alone.
CUDA_VENV                ?= .venv-cuda
CUDA_TORCH_VERSION       := 2.14.1
CUDA_TORCHVISION_VERSION := 0.29.1
CUDA_HOME                ?= /usr/local/cuda
CUDA_ARCHS               ?= 8.0;9.0+PTX
CUDA_CHECK_DIR           ?= build/cuda-check

# The CUDA build of torch and its nvidia wheels take about 5.5 GB installed: say so up front
# rather than fail inside pip with "No space left on device".
CUDA_VENV_GB := 6

$(CUDA_VENV)/.stack-installed: $(CUDA_LOCK)
	@free_gb=$$(df -Pk . | awk 'NR == 2 {print int($$4 / 1048576)}'); \
	test "$$free_gb" -ge $(CUDA_VENV_GB) || { echo "cuda-check: the CUDA torch venv \
	$(CUDA_VENV) needs about $(CUDA_VENV_GB) GB of disk, $$free_gb GB free here" >&2; exit 1; }
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -c $(CUDA_LOCK) "torch==$(CUDA_TORCH_VERSION)" \
		"torchvision==$(CUDA_TORCHVISION_VERSION)" ninja numpy wheel pytest
	$(CUDA_VENV)/bin/python -m pip check
	touch $@

# `setup.py build` puts the Python packages beside the extension, so that `import dk_ops` works
# from $(CUDA_CHECK_DIR)/lib. --force hands every build to ninja, which recompiles what changed,
# headers included (setuptools alone looks at the .cpp and .cu files only and would skip it).
# The test runs through bin/pytest: `python -m pytest` would put the working directory first
# on sys.path, and with it the CPU venv's dk_ops, built for another torch.
cuda-check: $(CUDA_VENV)/.stack-installed
	mkdir -p $(CUDA_CHECK_DIR)
	CUDA_HOME=$(CUDA_HOME) PATH="$(CUDA_HOME)/bin:$$PATH" \
	CPATH="$$($(CUDA_VENV)/bin/python -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "include"))')" \
	FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" MAX_JOBS=2 NVCC_APPEND_FLAGS=-Xptxas=-v \
	$(CUDA_VENV)/bin/python setup.py build --force --build-temp $(CUDA_CHECK_DIR)/temp \
		--build-lib $(CUDA_CHECK_DIR)/lib > $(CUDA_CHECK_DIR)/build.log 2>&1 \
		|| { tail -n 60 $(CUDA_CHECK_DIR)/build.log; exit 1; }
	$(CUDA_VENV)/bin/python tools/analysis_tools/cuda_resources.py $(CUDA_CHECK_DIR)/build.log \
		--arch sm_90
	$(CUDA_VENV)/bin/python -c 'import glob, torch; \
	torch.ops.load_library(glob.glob("$(CUDA_CHECK_DIR)/lib/dk_ops/_C.*.so")[0]); \
	has = torch._C._dispatch_has_kernel_for_dispatch_key; \
	missing = [(op, key) for op in ("deform_kernel_conv2d", "deform_kernel_conv2d_backward") \
	           for key in ("CPU", "CUDA", "AutocastCPU", "AutocastCUDA") \
	           if not has("dk_ops::" + op, key)]; \
	assert not missing, f"kernels not registered: {missing}"; \
	print("cuda-check: dk_ops CUDA kernels built for $(CUDA_ARCHS) and registered")'
	PYTHONPATH=$(CUDA_CHECK_DIR)/lib $(CUDA_VENV)/bin/pytest -q -p no:cacheprovider -rs \
		tests/test_benchmark_backbone.py
	TRITON_INTERPRET=1 PYTHONPATH=$(CUDA_CHECK_DIR)/lib $(CUDA_VENV)/bin/pytest -q \
		-p no:cacheprovider -rs tests/test_op_fused.py
	$(CUDA_VENV)/bin/python tools/analysis_tools/triton_resources.py

# Refreshes the lock: the stack resolved afresh (the pins above, nothing else) in scratch venvs,
# `make test` and `make cuda-check` there, and only then their `pip freeze` (local version
# labels such as +cpu dropped, so that either build of a version satisfies it) over the lock
# files. Takes as long as two fresh set-ups plus the suite (docs/development.md).
LOCK_VENV      := .venv-lock
LOCK_CUDA_VENV := .venv-cuda-lock
FREEZE         := -m pip freeze --all --exclude-editable | grep -v '^pip==' | sed -E 's/\+[A-Za-z0-9.]+$$//'

lock:
	rm -rf $(LOCK_VENV) $(LOCK_CUDA_VENV)
	$(MAKE) test VENV=$(LOCK_VENV) CPU_LOCK=/dev/null
	$(MAKE) cuda-check CUDA_VENV=$(LOCK_CUDA_VENV) CUDA_LOCK=/dev/null
	mkdir -p $(dir $(CPU_LOCK)) $(dir $(CUDA_LOCK))
	$(LOCK_VENV)/bin/python $(FREEZE) > $(CPU_LOCK)
	$(LOCK_CUDA_VENV)/bin/python $(FREEZE) > $(CUDA_LOCK)
	rm -rf $(LOCK_VENV) $(LOCK_CUDA_VENV)
	# The in-place build of dk_ops belongs to $(VENV) again.
	test ! -x $(VPY) || DK_OPS_EMULATED_CUDA=1 $(PIP) install --no-build-isolation --no-deps \
		--use-pep517 -e .

clean:
	rm -rf build dk_ops/_C*.so *.egg-info $(VENV)/.dk-built
