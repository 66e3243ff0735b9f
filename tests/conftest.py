"""Test-session settings that must hold before any CUDA work starts, and the fixture the benchmark
tests share.

``NVIDIA_TF32_OVERRIDE=0``: with Transformer Engine installed, megatron.core computes the MoE
router's logits with TE's cuBLAS GEMM, which uses TF32 for fp32 operands unless this is set; the
GPU tests compare fp32 models with fp32 references, so every GEMM stays in true fp32.
"""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")


@pytest.fixture
def bench(monkeypatch):
    """benchmarks/bench_qad_step.py as a module (with its sibling modules), unloaded afterwards."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_qad_step

    yield bench_qad_step
    for name in ("bench_qad_step", "megatron_step", "repeats"):
        sys.modules.pop(name, None)
