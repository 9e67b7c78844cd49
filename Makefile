# The two commands of README.md: `make demo` and `make test`. Each sets up what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
NVCC ?= $(shell command -v nvcc 2>/dev/null)
BUILD_STAMP := build/.collab_ops_built

.PHONY: test demo bench venv build check-cuda-headers wheel clean

# A CUDA torch already installed in the system python (the GPU machine) is reused through
# --system-site-packages; otherwise the CPU build of torch 2.13.0 is installed into the venv.
$(VENV)/.ready: requirements-test.txt tools/ensure_deps.py
	@if [ ! -x $(VPY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; \
	fi
	@$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install --quiet torch==2.13.0
	@$(VPY) tools/ensure_deps.py requirements-test.txt
	@touch $@

venv: $(VENV)/.ready

# Editable build of collab_ops._C; setup.py adds the CUDA sources when CUDA torch and nvcc exist.
$(BUILD_STAMP): $(VENV)/.ready setup.py $(shell find csrc -type f 2>/dev/null)
	$(VPY) -m pip install --quiet --no-build-isolation --no-deps -e .
	@mkdir -p build && touch $@

build: $(BUILD_STAMP)

# Compile-only check of the torch-free CUDA kernel headers (skipped without nvcc).
check-cuda-headers:
	@if [ -n "$(NVCC)" ]; then $(VPY) tools/check_cuda_headers.py --nvcc "$(NVCC)"; \
	else echo "check-cuda-headers: nvcc not found, skipped"; fi

test: $(BUILD_STAMP) check-cuda-headers
	$(VPY) -m pytest -q tests

bench: $(BUILD_STAMP)
	$(VPY) -m collab_ops bench

demo: $(BUILD_STAMP)
	$(VPY) -m collab_ops demo

wheel: $(VENV)/.ready
	$(VPY) -m pip wheel --quiet --no-build-isolation --no-deps -w dist .

clean:
	rm -rf build dist *.egg-info collab_ops/_C*.so
