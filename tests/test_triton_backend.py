"""GPU tests: the fused Triton NVFP4 kernels against the torch backend, bit for bit.

Run on a CUDA machine with ``make test-gpu`` (``pytest -m gpu``); skipped without CUDA.
Both backends run on the same CUDA tensor; packed bytes, scale bytes, the global amax,
dequantised values and fake-quantised values must have identical bit patterns.  The
slow spec reference (``spec_reference``) is checked on small CUDA inputs as well, so the
two GPU backends cannot agree on a wrong answer unnoticed.
"""

from __future__ import annotations

import pytest
import torch

import spec_reference as R

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from megatron_qad.numerics import fp8, nvfp4  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
FOS = pytest.mark.parametrize("four_over_six", [False, True], ids=["plain", "4over6"])
DT = pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
CUDA = "cuda"


def compare_backends(x, global_amax=None, four_over_six=False):
    """Assert backend="triton" and backend="torch" give bit-identical quantize / dequantize /
    fake_quantize results on the CUDA tensor ``x`` (and that "auto" picks the same bits)."""
    assert x.is_cuda
    qt = nvfp4.quantize(x, global_amax, four_over_six, backend="triton")
    qr = nvfp4.quantize(x, global_amax, four_over_six, backend="torch")
    K = x.shape[-1]
    lead = tuple(x.shape[:-1])
    assert qt.data.dtype == torch.uint8 and tuple(qt.data.shape) == lead + (K // 2,)
    assert qt.scale.dtype == torch.float8_e4m3fn and tuple(qt.scale.shape) == lead + (K // 16,)
    assert tuple(qt.shape) == tuple(x.shape) and qt.dtype == x.dtype
    assert qt.data.is_cuda and qt.scale.is_cuda
    R.assert_equal(qt.data, qr.data, "packed data triton vs torch")
    R.assert_equal(qt.scale.contiguous().view(torch.uint8), qr.scale.contiguous().view(torch.uint8),
                   "scales triton vs torch")
    R.assert_equal_bits(torch.as_tensor(qt.global_amax).float(), torch.as_tensor(qr.global_amax).float(),
                        "global_amax triton vs torch")
    R.assert_equal_bits(qt.dequantize(), qr.dequantize(), "dequantize triton vs torch")
    R.assert_equal_bits(qt.dequantize(torch.float32), qr.dequantize(torch.float32), "dequantize fp32")
    ft = nvfp4.fake_quantize(x, global_amax, four_over_six, backend="triton")
    fr = nvfp4.fake_quantize(x, global_amax, four_over_six, backend="torch")
    assert ft.dtype == x.dtype and ft.shape == x.shape and ft.is_cuda
    R.assert_equal_bits(ft, fr, "fake_quantize triton vs torch")
    R.assert_equal_bits(ft, qt.dequantize(), "triton fake_quantize vs triton quantize().dequantize()")
    fa = nvfp4.fake_quantize(x, global_amax, four_over_six, backend="auto")
    R.assert_equal_bits(fa, ft, "fake_quantize auto vs triton")
    return qt, qr


def compare_with_reference(x, global_amax=None, four_over_six=False):
    """Both GPU backends equal the CPU spec reference bit for bit (small inputs only)."""
    ref = R.nvfp4_reference(x, global_amax, four_over_six)
    for backend in ("triton", "torch"):
        q = nvfp4.quantize(x, global_amax, four_over_six, backend=backend)
        R.assert_equal(q.data.cpu(), ref.data_tensor(), f"{backend}: packed data vs spec")
        R.assert_equal(q.scale.cpu().view(torch.uint8), ref.scale_bits_tensor(), f"{backend}: scales vs spec")
        R.assert_equal_bits(q.dequantize(), ref.values, f"{backend}: dequantize vs spec")
        fq = nvfp4.fake_quantize(x, global_amax, four_over_six, backend=backend)
        R.assert_equal_bits(fq, ref.values, f"{backend}: fake_quantize vs spec")
    return ref


# --------------------------------------------------------------------------------------
# Large random tensors
# --------------------------------------------------------------------------------------
@FOS
@DT
@pytest.mark.parametrize("dist", ["normal", "heavy"])
def test_large_random(dist, dtype, four_over_six):
    """1024 x 4096 normal / heavy-tailed tensors with computed amax: triton == torch."""
    gen = R.normal if dist == "normal" else R.heavy_tailed
    x = gen((1024, 4096), dtype, seed=1 + DTYPES.index(dtype), device=CUDA)
    compare_backends(x, None, four_over_six)


@FOS
@DT
@pytest.mark.parametrize("amax_kind", ["float", "cpu_tensor", "cuda_tensor"])
@pytest.mark.parametrize("amax", [3.3, 0.05, 0.0])
def test_given_global_amax(amax, amax_kind, dtype, four_over_six):
    """Given global amax (Python float, CPU or CUDA 0-dim tensor), including one far below the
    data max (saturation) and 0 (S_enc = 1): triton == torch."""
    x = R.heavy_tailed((256, 1024), dtype, seed=10, device=CUDA)
    ga = {"float": amax, "cpu_tensor": torch.tensor(amax), "cuda_tensor": torch.tensor(amax, device=CUDA)}[amax_kind]
    compare_backends(x, ga, four_over_six)


@FOS
@DT
@pytest.mark.parametrize("shape", [(1, 16), (3, 48), (7, 5, 80), (1000, 272), (2, 3, 4, 528), (33, 4112)])
def test_odd_shapes(shape, dtype, four_over_six):
    """Row counts and widths that are not multiples of any kernel tile (masking / tails), 3-D and 4-D."""
    x = R.normal(shape, dtype, seed=20, device=CUDA) * 3
    compare_backends(x, None, four_over_six)


@FOS
def test_no_rows(four_over_six):
    """An empty [0, K] input (an expert routed no tokens) launches nothing: empty outputs."""
    x = torch.empty(0, 64, dtype=torch.bfloat16, device=CUDA)
    fake = nvfp4.fake_quantize(x, torch.zeros((), device=CUDA), four_over_six, backend="triton")
    packed = nvfp4.quantize(x, 1.0, four_over_six, backend="triton")
    assert fake.shape == (0, 64) and packed.data.shape == (0, 32) and packed.scale.shape == (0, 4)


@FOS
@DT
def test_3d_large(dtype, four_over_six):
    """A 3-D [8, 256, 1024] heavy-tailed tensor: triton == torch."""
    x = R.heavy_tailed((8, 256, 1024), dtype, seed=30, device=CUDA)
    compare_backends(x, None, four_over_six)


@FOS
@DT
@pytest.mark.parametrize("view", ["transposed", "column_slice", "row_step", "expanded"])
def test_noncontiguous(view, dtype, four_over_six):
    """Non-contiguous CUDA views: triton == torch, and both equal the result of .contiguous()."""
    base_t = R.heavy_tailed((4096, 1024), dtype, seed=40, device=CUDA)
    base_s = R.normal((512, 2048), dtype, seed=41, device=CUDA)
    x = {
        "transposed": base_t.t(),
        "column_slice": base_s[:, 256:1280],
        "row_step": base_s[::3, :1024],
        "expanded": base_s[:1, :1024].expand(64, 1024),
    }[view]
    assert not x.is_contiguous()
    qt, _ = compare_backends(x, None, four_over_six)
    qc = nvfp4.quantize(x.contiguous(), four_over_six=four_over_six, backend="triton")
    R.assert_equal(qt.data, qc.data, "data vs contiguous")
    R.assert_equal(qt.scale.view(torch.uint8), qc.scale.view(torch.uint8), "scales vs contiguous")


# --------------------------------------------------------------------------------------
# Constructed edge cases (shared generators), against torch and the spec reference
# --------------------------------------------------------------------------------------
@FOS
@DT
@pytest.mark.parametrize("k", [-4, 0, 3])
def test_e2m1_ties(k, dtype, four_over_six):
    """Scaled values exactly on every E2M1 tie (with -0.0 and small negatives): triton == torch == spec."""
    x, G = R.ties_case(k, four_over_six, dtype=dtype, seed=50 + k, device=CUDA)
    compare_backends(x, G, four_over_six)
    compare_with_reference(x, G, four_over_six)


@FOS
@DT
def test_block_scale_ties(dtype, four_over_six):
    """FP8 block-scale inputs exactly on E4M3 ties: triton == torch == spec."""
    x, G = R.scale_ties_case(four_over_six, dtype=dtype, seed=60, device=CUDA)
    compare_backends(x, G, four_over_six)
    compare_with_reference(x, G, four_over_six)


@FOS
def test_block_scale_association_order(four_over_six):
    """Scale inputs that hit E4M3 midpoints only with (amax_b / 6) * S_enc in that order
    (catches reassociation or reciprocal-multiply in the kernel): triton == torch == spec."""
    x, G, _ = R.scale_order_case(four_over_six, seed=45, device=CUDA)
    compare_backends(x, G, four_over_six)
    compare_with_reference(x, G, four_over_six)


def test_four_over_six_error_sum_order():
    """Blocks whose 4/6 choice depends on the summation order / rounding of the squared errors
    (exact fp32 ties included): catches a non-pairwise sum and FMA contraction of
    ``value - x`` or ``d0*d0 + d1*d1`` in the kernel; triton == torch == spec."""
    x, G, caught = R.four_over_six_sum_order_case(seed=0, device=CUDA)
    assert caught == set(R.SUM_ALTERNATIVES)
    compare_backends(x, G, True)
    compare_with_reference(x, G, True)


@FOS
@DT
def test_zero_blocks(dtype, four_over_six):
    """All-zero blocks (with -0.0) inside nonzero data: triton == torch == spec."""
    x = R.zero_blocks_case(dtype, seed=70, device=CUDA)
    compare_backends(x, None, four_over_six)
    compare_with_reference(x, None, four_over_six)
    big = R.normal((512, 1024), dtype, seed=71, device=CUDA)
    big.view(-1, 16)[::5] = 0
    compare_backends(big, None, four_over_six)


@FOS
@DT
def test_all_zero(dtype, four_over_six):
    """An all-zero tensor (amax 0 -> S_enc = 1): triton == torch == spec (all +0.0)."""
    x = torch.zeros(64, 256, dtype=dtype, device=CUDA)
    x[:, 3::7] = -0.0
    compare_backends(x, None, four_over_six)
    compare_with_reference(x[:4], None, four_over_six)


@FOS
@DT
def test_block_scale_underflow(dtype, four_over_six):
    """Blocks from 1e3 down to 1e-6: normal, subnormal and zero (underflowed) FP8 block scales."""
    x = R.underflow_case(dtype, seed=80, device=CUDA)
    compare_backends(x, None, four_over_six)
    compare_with_reference(x, None, four_over_six)


@FOS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tiny_negatives_underflowing_to_minus_zero(dtype, four_over_six):
    """Tiny negatives whose scaled value underflows to -0.0 get code 0 (sign from the scaled
    value, which is not < 0): triton == torch == spec.  Also catches a kernel that flushes
    fp32 subnormals to zero differently from the torch path."""
    x, _ = R.signed_underflow_case(dtype, seed=85, device=CUDA)
    compare_backends(x, None, four_over_six)
    compare_with_reference(x, None, four_over_six)


@FOS
@DT
def test_saturation(dtype, four_over_six):
    """Given amax 20x below the data max: scales clamp at 448, codes at +-6; triton == torch == spec."""
    x = R.heavy_tailed((16, 64), dtype, seed=90, device=CUDA)
    G = float(x.float().abs().max()) / 20
    compare_backends(x, G, four_over_six)
    compare_with_reference(x, G, four_over_six)


@FOS
@DT
@pytest.mark.parametrize("dist", ["normal", "heavy"])
def test_small_random_against_reference(dist, dtype, four_over_six):
    """Small random CUDA tensors: both GPU backends equal the CPU spec reference bit for bit."""
    gen = R.normal if dist == "normal" else R.heavy_tailed
    x = gen((16, 128), dtype, seed=95, device=CUDA)
    compare_with_reference(x, None, four_over_six)
    compare_with_reference(x, 1.7, four_over_six)


# --------------------------------------------------------------------------------------
# Autograd, errors, FP8 on CUDA
# --------------------------------------------------------------------------------------
@FOS
@DT
def test_triton_gradient_is_identity(dtype, four_over_six):
    """The Triton fake_quantize has a straight-through gradient: grad == upstream grad exactly."""
    x = R.normal((64, 256), dtype, seed=100, device=CUDA).requires_grad_(True)
    g = R.normal((64, 256), dtype, seed=101, device=CUDA)
    y = nvfp4.fake_quantize(x, 0.5, four_over_six, backend="triton")
    (y * g).sum().backward()
    R.assert_equal_bits(x.grad, g, "gradient")


def test_triton_rejects_bad_input():
    """The Triton path validates like the torch path: last dim % 16 -> ValueError,
    integer dtype -> TypeError, NaN/Inf -> ValueError."""
    with pytest.raises(ValueError, match="16"):
        nvfp4.quantize(torch.randn(4, 24, device=CUDA), backend="triton")
    with pytest.raises(TypeError):
        nvfp4.quantize(torch.ones(4, 32, dtype=torch.int32, device=CUDA), backend="triton")
    x = torch.randn(4, 32, device=CUDA)
    x[1, 3] = float("nan")
    with pytest.raises(ValueError):
        nvfp4.quantize(x, backend="triton")
    with pytest.raises(ValueError):
        nvfp4.fake_quantize(x, backend="triton")


@DT
@pytest.mark.parametrize("amax", [None, 0.1, 0.0])
def test_fp8_cuda_matches_cpu_and_reference(amax, dtype):
    """fp8.fake_quantize_e4m3 on CUDA equals the CPU result (large tensor) and the spec (small)."""
    x = R.heavy_tailed((512, 1024), dtype, seed=110, device=CUDA)
    a = float(x.float().abs().max()) if amax is None else amax
    out = fp8.fake_quantize_e4m3(x, a)
    R.assert_equal_bits(out, fp8.fake_quantize_e4m3(x.cpu(), a), "fp8 CUDA vs CPU")
    R.assert_equal_bits(out, fp8.fake_quantize_e4m3(x, torch.tensor(a, device=CUDA)), "fp8 CUDA tensor amax")
    small = x[:8, :64]
    R.assert_equal_bits(fp8.fake_quantize_e4m3(small, a), R.fp8_e4m3_reference(small, a), "fp8 CUDA vs spec")


@DT
@pytest.mark.parametrize("amax", [3.0, 0.0, 1e-30])
def test_fp8_triton_kernel_equals_torch_formula_on_special_values(amax, dtype):
    """The fused FP8 kernel and the torch formula on the same CUDA tensor: same bits for signed
    zeros, values far above amax (saturation), tiny values, NaN and Inf, an odd element count and a
    non-contiguous input (K and V arrive as views of the fused QKV projection)."""
    x = R.heavy_tailed((3, 1001, 7), dtype, seed=111, device=CUDA).transpose(0, 1)
    assert not x.is_contiguous()  # the input really is a strided view
    special = torch.tensor([0.0, -0.0, 1e4, -1e4, 1e-7, -1e-7, float("nan"), float("inf"), float("-inf")],
                           dtype=dtype, device=CUDA)
    x[: special.numel(), 0, 0] = special
    triton_out = fp8.fake_quantize_e4m3(x, amax, backend="triton")
    torch_out = fp8.fake_quantize_e4m3(x, amax, backend="torch")
    assert triton_out.shape == x.shape and triton_out.dtype == dtype
    nan = torch.isnan(torch_out)
    assert nan.any() and torch.equal(torch.isnan(triton_out), nan)  # NaN payloads may differ
    zero = torch.zeros((), dtype=dtype, device=CUDA)
    R.assert_equal_bits(torch.where(nan, zero, triton_out), torch.where(nan, zero, torch_out),
                        f"fp8 triton vs torch (amax={amax})")
