# Two commands a user needs: `make run` and `make test`. Both set up .venv/ first (idempotent).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.setup-done

.PHONY: setup run test clean gpu-check gpu-wheels

setup: $(STAMP)

# Torch is pinned and installed first so that CPU machines never pull CUDA wheels; deepspeed and
# megatron-core need --no-build-isolation (they import torch at build time), deepspeed with its
# C++/CUDA ops disabled (DS_BUILD_OPS=0): they JIT-build on first use where a compiler exists.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -e '.[dev]'
	DS_BUILD_OPS=0 $(PIP) install --quiet --no-build-isolation 'deepspeed>=0.19,<0.20' 'megatron-core>=0.16,<0.17' || \
	  echo "warning: deepspeed / megatron-core extras did not install; tests that need them will be skipped"
	@# DeepSpeed JIT-builds a small shared-memory op with g++ on first use (minutes on 2 cores): build it once
	@# here rather than inside the first test that initializes ZeRO.
	-$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null 2>&1
	touch $(STAMP)

run: setup
	$(VENV)/bin/spindle train configs/demo.yaml --run-dir runs/demo

# pytest exits 5 when it collected nothing: that is a broken suite, not a pass.
test: setup
	@$(PY) -m pytest -q --durations=25 tests $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) runs .pytest_cache

# The GPU check (benchmarks/gpu_check.py): installs spindle onto the machine's own torch (no dependencies,
# no index) and runs every GPU test and benchmark in about 7 minutes, report in GPU_CHECK_OUT (default
# docs/benchmarks/gpu/). DRY_RUN=1 runs the same parts on a CPU with tiny shapes, with this checkout's .venv.
DRY := $(filter 1 yes true,$(DRY_RUN))
GPU_PYTHON ?= $(if $(DRY),$(PY),python3)
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py $(if $(DRY),--dry-run) $(if $(GPU_CHECK_OUT),--out $(GPU_CHECK_OUT)) $(GPU_CHECK_ARGS)

# Pure-Python wheels the GPU machine lacks, pinned, into .whl/ (ignored; about 1.5 MB): fla's chunk kernels
# (fla-core needs only einops; flash-linear-attention adds its layers and models, needs transformers >= 5.6)
# and Lightning Attention. Carry .whl to the GPU machine; gpu-check installs them with --no-index.
GPU_WHEELS := fla-core==0.6.0 flash-linear-attention==0.6.0 lightning-attn==0.0.5
gpu-wheels:
	mkdir -p .whl
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --dest .whl $(GPU_WHEELS)
