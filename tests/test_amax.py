"""The tensor amax (``numerics.amax``): torch's reduction and the Triton two-launch one give the same
fp32 value, NaN for a tensor holding a NaN, +0 for zeros of either sign and for an empty tensor.

CPU: the dispatcher (torch below the size threshold and on the CPU); the Triton kernels under
Triton's interpreter (``TRITON_INTERPRET=1``, in a subprocess) with a small tile, so one tensor
spans more partial maxima than the reduction reads at once. GPU (``gpu``): the kernels on a tensor
above the threshold, through the dispatcher. Runtime on 2 CPU cores: about 20 s (the interpreter).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_qad.numerics import amax

DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                                 ids=["bf16", "fp16", "fp32"])


def special_cases(numel: int, dtype: torch.dtype, device) -> dict:
    """Tensors whose amax is easy to get wrong, each of numel elements."""
    generator = torch.Generator(device=device).manual_seed(5)
    base = torch.randn(numel, generator=generator, device=device).to(dtype)
    last_is_max, negative_max, nan, inf, nan_and_inf = (base.clone() for _ in range(5))
    last_is_max[-1] = 100
    negative_max[numel // 3] = -200
    nan[numel // 2 + 1] = float("nan")
    inf[7] = float("-inf")
    nan_and_inf[3], nan_and_inf[-2] = float("inf"), float("nan")
    return {"random": base, "last element the max": last_is_max, "negative max": negative_max,
            "a NaN": nan, "an -inf": inf, "a NaN and an inf": nan_and_inf,
            "negative zeros": torch.full((numel,), -0.0, dtype=dtype, device=device)}


def assert_same_amax(got: torch.Tensor, x: torch.Tensor, what: str) -> None:
    expected = torch.linalg.vector_norm(x.float(), ord=float("inf"))
    assert got.dtype == torch.float32 and got.shape == (), what
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32)) or (
        got.isnan() and expected.isnan()), f"{what}: {got} != {expected}"


@DTYPES
def test_the_dispatcher_on_the_cpu_is_torchs_reduction(dtype):
    for what, x in special_cases(1000, dtype, "cpu").items():
        assert_same_amax(amax.absolute_max(x), x, what)
    empty = amax.absolute_max(torch.empty(0, 16, dtype=dtype))
    assert empty.shape == () and empty.item() == 0.0


_INTERPRETED = """
import torch
from megatron_qad.numerics import amax_triton
from tests.test_amax import special_cases, assert_same_amax
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    for numel in (2001, 16):  # 126 partials of 16, a ragged last tile; one
        for what, x in special_cases(numel, dtype, "cpu").items():
            assert_same_amax(amax_triton.absolute_max(x, tile=16), x, f"{dtype} {numel} {what}")
x = special_cases(amax_triton.MAX_PARTIALS * 16 + 1, torch.bfloat16, "cpu")["a NaN and an inf"]
assert_same_amax(amax_triton.absolute_max(x, tile=16), x, "more than MAX_PARTIALS tiles of 16: tiles of 32")
x[-2] = 0
assert_same_amax(amax_triton.absolute_max(x, tile=16), x, "the same, the inf the max")
print("interpreted kernels agree")
"""


def test_the_triton_kernels_under_the_interpreter_equal_torchs_reduction():
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", _INTERPRETED], env=env, cwd=root,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "interpreted kernels agree" in result.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@DTYPES
def test_the_dispatcher_above_the_threshold_equals_torchs_reduction_on_the_gpu(dtype):
    numel = amax.TRITON_MIN_ELEMENTS + 4099  # a ragged last tile
    for what, x in special_cases(numel, dtype, "cuda").items():
        assert_same_amax(amax.absolute_max(x), x, what)
        assert_same_amax(amax.absolute_max(x[:-1]), x[:-1], f"{what}, one element fewer")
