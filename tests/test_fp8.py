"""CPU tests of ``megatron_qad.numerics.fp8.fake_quantize_e4m3`` against the spec reference.

out = (e4m3_rne(clamp(x * s, -448, 448)) / s) cast to x's dtype, with
s = min(448 / amax, FLT_MAX) in fp32 (s = 1 when amax == 0 or s == 0).
Values are compared as bit patterns, so -0.0 vs +0.0 and one-ulp errors fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import spec_reference as R
from megatron_qad.numerics import fp8

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


def check_fp8(x, amax):
    """fake_quantize_e4m3(x, amax) has x's dtype and shape and equals the reference bit for bit."""
    out = fp8.fake_quantize_e4m3(x, amax)
    assert out.dtype == x.dtype and tuple(out.shape) == tuple(x.shape)
    expected = R.fp8_e4m3_reference(x, amax)
    R.assert_equal_bits(out, expected, f"fake_quantize_e4m3 (amax={amax!r})")
    return out


@pytest.mark.parametrize("amax_kind", ["float", "tensor"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("dist", ["normal", "heavy"])
def test_random_matches_reference(dist, dtype, amax_kind):
    """Random normal / heavy-tailed data with amax = max|x| (float or 0-dim tensor): bit-exact."""
    gen = R.normal if dist == "normal" else R.heavy_tailed
    x = gen((16, 64), dtype, seed=1000 + DTYPES.index(dtype))
    amax = float(x.float().abs().max())
    check_fp8(x, amax if amax_kind == "float" else torch.tensor(amax, dtype=torch.float32))


@pytest.mark.parametrize("amax", [0.3, 3.3, 1e-4, 1e4])
def test_amax_not_exact_in_fp32(amax):
    """amax values not exact in fp32 (and very small / large ones): s = 448 / fp32(amax) in fp32."""
    x = R.normal((8, 64), torch.float32, seed=1010) * 2
    check_fp8(x, amax)
    check_fp8(x, torch.tensor(amax))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_saturation(dtype):
    """amax 8x below max|x|: out-of-range values saturate to +-448 / s (not NaN, not inf)."""
    x = R.heavy_tailed((8, 64), dtype, seed=1020)
    amax = float(x.float().abs().max()) / 8
    out = check_fp8(x, amax)
    s = np.float32(448.0) / np.float32(amax)
    limit = float(np.float32(np.float32(448.0) / s))
    big = x.float().abs() * float(s) > 448
    assert big.any()
    assert bool((out.float()[big].abs() == float(torch.tensor(limit).to(dtype))).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("amax_kind", ["float", "tensor"])
def test_amax_zero(amax_kind, dtype):
    """amax 0 uses s = 1: the output is plain E4M3 rounding of x (saturating at 448)."""
    x = R.normal((8, 32), dtype, seed=1030) * 100
    out = check_fp8(x, 0.0 if amax_kind == "float" else torch.tensor(0.0))
    direct = x.float().clamp(-448, 448).to(torch.float8_e4m3fn).float().to(dtype)
    R.assert_equal_bits(out, direct, "amax 0 -> s = 1")


def test_ties_and_signed_zero():
    """With amax 448 (s = 1): every midpoint between adjacent E4M3 values rounds to the even
    mantissa; -0.0 stays -0.0, small negatives round to -0.0, small positives to +0.0."""
    vals = torch.tensor(R.E4M3_VALUES)
    mids = (vals[:-1] + vals[1:]) / 2
    extra = torch.tensor([0.0, -0.0, 1e-9, -1e-9, 2.0**-10, -(2.0**-10), 448.0, -448.0, 500.0, -1e6])
    x = torch.cat([mids, -mids, vals, -vals, extra])
    x = torch.cat([x, torch.zeros(-x.numel() % 16)]).reshape(-1, 16)
    out = check_fp8(x, 448.0)
    o = out.reshape(-1)
    n = mids.numel()
    for i in range(n):
        lo_byte = R.E4M3_TABLE[i][1]
        expect = R.E4M3_VALUES[i] if lo_byte % 2 == 0 else R.E4M3_VALUES[i + 1]
        assert float(o[i]) == expect, (float(mids[i]), float(o[i]), expect)
        assert float(o[n + i]) == -expect
    base = 2 * n + 2 * vals.numel()
    assert R.bits(o[base + 1]) == R.bits(torch.tensor(-0.0)), "-0.0 must stay -0.0"
    assert torch.signbit(o[base + 3]) and o[base + 3] == 0, "-1e-9 must round to -0.0"
    assert R.bits(o[base + 4]) == 0, "2**-10 ties to +0.0"
    assert float(o[base + 8]) == 448.0 and float(o[base + 9]) == -448.0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_noncontiguous_and_3d(dtype):
    """3-D and transposed inputs give the same bits as the reference (and as .contiguous())."""
    x = R.normal((4, 3, 32), dtype, seed=1040)
    check_fp8(x, 2.5)
    xt = R.heavy_tailed((32, 16), dtype, seed=1041).t()
    out = check_fp8(xt, 10.0)
    R.assert_equal_bits(out, fp8.fake_quantize_e4m3(xt.contiguous(), 10.0), "transposed vs contiguous")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("amax", [3.0, 0.1])
def test_gradient_is_identity(amax, dtype):
    """Straight-through estimator: grad of sum(fake_quantize_e4m3(x) * g) is exactly g,
    also where x saturates (amax 0.1)."""
    x = R.normal((8, 32), dtype, seed=1050).requires_grad_(True)
    g = R.normal((8, 32), dtype, seed=1051)
    y = fp8.fake_quantize_e4m3(x, amax)
    assert y.requires_grad
    (y * g).sum().backward()
    assert x.grad is not None and x.grad.dtype == dtype
    R.assert_equal_bits(x.grad, g, "gradient")


def test_backend_is_checked():
    x = torch.ones(4, 16)
    with pytest.raises(ValueError, match="backend must be one of"):
        fp8.fake_quantize_e4m3(x, 1.0, backend="cuda")
    with pytest.raises(ValueError, match="CUDA tensors only"):
        fp8.fake_quantize_e4m3(x, 1.0, backend="triton")
