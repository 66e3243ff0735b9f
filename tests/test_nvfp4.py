"""CPU tests of ``megatron_qad.numerics.nvfp4`` (torch backend) against the spec reference.

Every numerical check is bit-exact: packed E2M1 bytes, FP8 block-scale bytes,
the global amax and the dequantised values are compared as bit patterns, so
-0.0 vs +0.0 and one-ulp differences count as failures.  The expected values
come from ``spec_reference.nvfp4_reference``, a slow scalar implementation
written from the spec independently of the package.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import spec_reference as R
from megatron_qad.numerics import nvfp4

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


def check_quantize(x, global_amax=None, four_over_six=False, backend="torch"):
    """Quantise ``x`` with the package and assert every output equals the reference bit for bit.

    Checks: data (dtype uint8, shape [..., K/2], packed codes), scale (dtype
    float8_e4m3fn, shape [..., K/16], bytes), global_amax (fp32, 0-dim, bits),
    the metadata (shape, dtype, four_over_six), dequantize() in the input dtype
    and in fp32, and fake_quantize().  Returns (QuantizedTensor, reference).
    """
    ref = R.nvfp4_reference(x, global_amax, four_over_six)
    q = nvfp4.quantize(x, global_amax, four_over_six, backend=backend)
    K = x.shape[-1]
    lead = tuple(x.shape[:-1])

    assert tuple(q.shape) == tuple(x.shape)
    assert q.dtype == x.dtype
    assert bool(q.four_over_six) == four_over_six

    assert q.data.dtype == torch.uint8
    assert tuple(q.data.shape) == lead + (K // 2,)
    R.assert_equal(q.data.cpu(), ref.data_tensor(), "packed E2M1 data")

    assert q.scale.dtype == torch.float8_e4m3fn
    assert tuple(q.scale.shape) == lead + (K // 16,)
    R.assert_equal(q.scale.cpu().contiguous().view(torch.uint8), ref.scale_bits_tensor(), "E4M3 block scales")

    ga = torch.as_tensor(q.global_amax)
    assert ga.dtype == torch.float32 and ga.dim() == 0
    R.assert_equal_bits(ga.cpu(), torch.tensor(ref.global_amax, dtype=torch.float32), "global_amax")

    deq = q.dequantize()
    assert deq.dtype == x.dtype and tuple(deq.shape) == tuple(x.shape)
    R.assert_equal_bits(deq, ref.values, "dequantize()")

    deq32 = q.dequantize(torch.float32)
    R.assert_equal_bits(deq32, torch.from_numpy(ref.values_fp32.copy()), "dequantize(torch.float32)")

    fq = nvfp4.fake_quantize(x, global_amax, four_over_six, backend=backend)
    assert fq.dtype == x.dtype and tuple(fq.shape) == tuple(x.shape)
    R.assert_equal_bits(fq, ref.values, "fake_quantize()")
    return q, ref


def unpack_codes(data: torch.Tensor) -> torch.Tensor:
    """Packed bytes [..., K/2] -> 4-bit codes [..., K] (element 2i in the low nibble)."""
    data = data.cpu().to(torch.int64)
    lo, hi = data & 0xF, (data >> 4) & 0xF
    return torch.stack([lo, hi], dim=-1).reshape(*data.shape[:-1], data.shape[-1] * 2)


# --------------------------------------------------------------------------------------
# The reference itself
# --------------------------------------------------------------------------------------
def test_reference_e4m3_rounding_matches_ieee_rne():
    """The reference's enumerated E4M3 rounding agrees with torch's float8_e4m3fn cast
    (an independent RNE implementation) on random values, all midpoints and signed zeros,
    so a bug in the reference cannot silently be shared by the comparison tests."""
    g = torch.Generator().manual_seed(11)
    vals = torch.tensor(R.E4M3_VALUES)
    x = torch.cat(
        [
            torch.randn(3000, generator=g) * 10.0 ** torch.randint(-5, 3, (3000,), generator=g).float(),
            vals,
            -vals,
            (vals[:-1] + vals[1:]) / 2,
            -(vals[:-1] + vals[1:]) / 2,
            torch.tensor([1e-30, -1e-30, -0.0]),
        ]
    ).clamp(-448, 448)
    ours = torch.tensor([R.e4m3_rne(v)[1] for v in x.numpy()], dtype=torch.uint8)
    R.assert_equal(ours, x.to(torch.float8_e4m3fn).view(torch.uint8), "reference e4m3_rne vs torch cast")


def test_reference_e2m1_ties_and_signs():
    """The reference's E2M1 rounding sends every tie to the even index and sets the sign bit
    exactly for negative scaled values (-0.0 -> code 0, small negatives -> code 8)."""
    for t, expect in R.E2M1_TIES.items():
        assert R.E2M1_MAGNITUDES[R.e2m1_code(t)] == expect
        assert R.e2m1_code(-t) == R.e2m1_code(t) | 8
    assert R.e2m1_code(-0.0) == 0
    assert R.e2m1_code(-0.1) == 8
    assert R.e2m1_code(6.0) == 7 and R.e2m1_code(-6.0) == 15
    assert np.signbit(R.e2m1_value(8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_reference_casts_match_torch(dtype):
    """The reference's own fp32 -> bf16/fp16 RNE casts agree with torch's casts."""
    g = torch.Generator().manual_seed(12)
    y = torch.randn(20000, generator=g) * 10.0 ** torch.randint(-9, 4, (20000,), generator=g).float()
    R.assert_equal_bits(R.cast_from_fp32(y.numpy(), dtype), y.to(dtype), f"reference cast to {dtype}")


# --------------------------------------------------------------------------------------
# Random data, all dtypes, computed and given amax, 4/6 on and off
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("four_over_six", [False, True], ids=["plain", "4over6"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("dist", ["normal", "heavy"])
def test_random_matches_reference(dist, dtype, four_over_six):
    """Normal and heavy-tailed (Student-t / Cauchy) data with the amax computed from the
    tensor: every output of quantize / dequantize / fake_quantize is bit-identical to the spec."""
    gen = R.normal if dist == "normal" else R.heavy_tailed
    x = gen((16, 64), dtype, seed=100 + DTYPES.index(dtype))
    check_quantize(x, None, four_over_six)


@pytest.mark.parametrize("four_over_six", [False, True], ids=["plain", "4over6"])
@pytest.mark.parametrize("amax_kind", ["float", "tensor"])
@pytest.mark.parametrize("amax", [3.3, 0.7123456789, 17.0, 1e-3])
def test_given_global_amax(amax, amax_kind, four_over_six):
    """A given global amax (Python float, rounded to fp32, or a 0-dim fp32 tensor) is used
    instead of max|x|: S_enc = 6*E4M3_MAX/fp32(amax) in fp32.  Values like 3.3 are not exact
    in fp32, so computing the scale in fp64 would be caught.  Amaxes below the data max
    also exercise saturation."""
    x = R.normal((8, 64), torch.bfloat16, seed=7)
    ga = amax if amax_kind == "float" else torch.tensor(amax, dtype=torch.float32)
    q, ref = check_quantize(x, ga, four_over_six)
    assert float(q.global_amax) == float(np.float32(amax))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_float_and_tensor_amax_agree(dtype):
    """quantize with global_amax as a Python float and as the equal 0-dim tensor gives identical
    outputs, and both equal passing the computed max|x| explicitly."""
    x = R.heavy_tailed((8, 32), dtype, seed=8)
    amax = float(x.float().abs().max())
    q0 = nvfp4.quantize(x, backend="torch")
    q1 = nvfp4.quantize(x, amax, backend="torch")
    q2 = nvfp4.quantize(x, torch.tensor(amax), backend="torch")
    for q in (q1, q2):
        R.assert_equal(q.data, q0.data, "data")
        R.assert_equal(q.scale.view(torch.uint8), q0.scale.view(torch.uint8), "scale")
        R.assert_equal_bits(q.dequantize(), q0.dequantize(), "values")


# --------------------------------------------------------------------------------------
# Exact ties
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("k", [-4, 0, 3])
def test_e2m1_ties_round_to_even(k, dtype):
    """Blocks whose scaled values are exactly 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0 (and negatives):
    the codes must be the even-index neighbours (0, 1, 1, 2, 2, 4, 4), -0.0 must give code 0
    and a small negative that rounds to zero code 8; plus full bit-exactness."""
    x, G = R.ties_case(k, four_over_six=False, dtype=dtype, seed=20 + k)
    q, ref = check_quantize(x, G)
    assert ref.s_enc == np.float32(2.0**k)
    scaled = torch.from_numpy(ref.scaled.copy())
    codes = unpack_codes(q.data)
    seen = set()
    for t, expect in R.E2M1_TIES.items():
        for sign, sign_bit in ((1.0, 0), (-1.0, 8)):
            at = scaled == sign * t
            assert at.any(), f"case does not hit the tie {sign * t}"
            expected_code = R.E2M1_MAGNITUDES.index(expect) | sign_bit
            got = codes[at]
            assert bool((got == expected_code).all()), (
                f"scaled value {sign * t}: codes {sorted(set(got.tolist()))}, expected {expected_code}"
            )
            seen.add(sign * t)
    assert len(seen) == 14
    # -0.0 in the input (scaled value -0.0) -> code 0; -0.1 * 2**j (scaled -0.1) -> code 8.
    neg_zero = torch.signbit(scaled) & (scaled == 0)
    assert neg_zero.any() and bool((codes[neg_zero] == 0).all())
    small_neg = (scaled < 0) & (scaled > -0.25)
    assert small_neg.any() and bool((codes[small_neg] == 8).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("k", [-2, 2])
def test_e2m1_ties_four_over_six(k, dtype):
    """The tie tensor (S_enc = 2**k in 4/6 mode) quantised with four_over_six is bit-exact."""
    x, G = R.ties_case(k, four_over_six=True, dtype=dtype, seed=30 + k)
    _, ref = check_quantize(x, G, True)
    assert ref.s_enc == np.float32(2.0**k)


@pytest.mark.parametrize("four_over_six", [False, True], ids=["plain", "4over6"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_block_scale_e4m3_ties(dtype, four_over_six):
    """Blocks whose FP8 scale input (amax_b / 6) * S_enc is exactly an E4M3 tie (normal,
    subnormal, binade-crossing, next to 448 and the zero/subnormal boundary): the stored scale
    byte must be the even-mantissa neighbour, checked against a hand-written table."""
    x, G = R.scale_ties_case(four_over_six, dtype=dtype, seed=40)
    q, ref = check_quantize(x, G, four_over_six)
    scale_in = ref.scale_inputs.reshape(-1)
    got = q.scale.float().reshape(-1)
    ties = [t for t, v in R.E4M3_SCALE_TIES.items() if v is not None]
    for t in ties:
        at = torch.from_numpy(scale_in == np.float32(t))
        assert at.any(), f"no block hits the scale tie {t}"
        if not four_over_six:
            expect = R.E4M3_SCALE_TIES[t]
            assert bool((got[at] == expect).all()), f"scale tie {t}: got {got[at].tolist()}, expected {expect}"


@pytest.mark.parametrize("four_over_six", [False, True], ids=["plain", "4over6"])
def test_block_scale_association_order(four_over_six):
    """Block scale inputs that are exact E4M3 midpoints only when computed as
    (amax_b / 6) * S_enc in fp32, in that order (S_enc is not a power of two here); computing
    amax_b * (S_enc / 6) or (amax_b * S_enc) / 6 instead rounds some scales differently."""
    x, G, ties = R.scale_order_case(four_over_six, seed=45)
    _, ref = check_quantize(x, G, four_over_six)
    hit = set(float(v) for v in ref.scale_inputs.reshape(-1))
    assert len(ties) >= 8 and all(t in hit for t in ties), "case must feed exact midpoints to e4m3_rne"


# --------------------------------------------------------------------------------------
# Zeros, underflow, saturation
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("four_over_six", [False, True], ids=["plain", "4over6"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_zero_blocks(dtype, four_over_six):
    """All-zero blocks (containing -0.0 entries) inside a nonzero tensor get scale 0, codes 0
    and dequantise to +0.0 (the scaled value 0 * FLT_MAX is +-0, never < 0); the rest is bit-exact."""
    x = R.zero_blocks_case(dtype, seed=50)
    q, ref = check_quantize(x, None, four_over_six)
    zero_block = (x.float().reshape(8, -1, 16) == 0).all(-1)
    assert zero_block.any()
    assert bool((q.scale.view(torch.uint8)[zero_block] == 0).all())
    codes = unpack_codes(q.data).reshape(8, -1, 16)
    assert bool((codes[zero_block] == 0).all())
    deq = q.dequantize().reshape(8, -1, 16)
    assert bool((R.bits(deq)[zero_block] == 0).all()), "zero blocks must dequantise to +0.0"


@pytest.mark.parametrize("four_over_six", [False, True], ids=["plain", "4over6"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_all_zero_tensor(dtype, four_over_six):
    """An all-zero tensor (with some -0.0): amax 0 -> S_enc = 1, all scales and codes 0,
    global_amax 0, and the output is +0.0 everywhere."""
    x = torch.zeros(4, 48, dtype=dtype)
    x[:, 1::5] = -0.0
    q, ref = check_quantize(x, None, four_over_six)
    assert ref.s_enc == 1.0
    assert float(q.global_amax) == 0.0
    assert int(q.data.count_nonzero()) == 0
    assert int(q.scale.view(torch.uint8).count_nonzero()) == 0
    assert int(R.bits(q.dequantize()).count_nonzero()) == 0


@pytest.mark.parametrize("four_over_six", [False, True], ids=["plain", "4over6"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_block_scale_underflow(dtype, four_over_six):
    """Blocks 1e-6 .. 1e3 in one tensor: the FP8 block scale is normal, subnormal or underflows
    to 0.  With d = 0 the spec gives e = FLT_MAX, so nonzero elements saturate to codes +-6
    (0x7 / 0xF) while dequantising to +-0.0; everything must match bit for bit."""
    x = R.underflow_case(dtype, seed=60)
    q, ref = check_quantize(x, None, four_over_six)
    sb = ref.scale_bits.reshape(-1)
    assert (sb == 0).any(), "case must contain blocks whose scale underflows to 0"
    assert ((sb > 0) & (sb < 8)).any(), "case must contain subnormal E4M3 block scales"
    assert (sb >= 8).any()


@pytest.mark.parametrize("four_over_six", [False, True], ids=["plain", "4over6"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tiny_negatives_whose_scaled_value_underflows(dtype, four_over_six):
    """Tiny negative elements (-2**-149 in fp32, -2**-133 in bf16) in blocks with a huge max:
    x * e underflows to -0.0, which is not < 0, so the spec's code is 0 (not 8) and the value
    +0.0.  Deriving the sign bit from x instead of the scaled value fails here."""
    x, _ = R.signed_underflow_case(dtype, seed=65)
    q, ref = check_quantize(x, None, four_over_six)
    xf = torch.from_numpy(x.float().numpy().copy())
    scaled = torch.from_numpy(ref.scaled.copy())
    m = (xf < 0) & (scaled == 0)
    assert m.any(), "case must contain negative elements whose scaled value is -0.0"
    assert bool((unpack_codes(q.data)[m] == 0).all())


@pytest.mark.parametrize("four_over_six", [False, True], ids=["plain", "4over6"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_saturation_small_global_amax(dtype, four_over_six):
    """A given global amax 20x smaller than the true max: block scales clamp at 448 and scaled
    values clamp at +-6 (codes 7 / 15); bit-exact against the spec."""
    x = R.heavy_tailed((8, 64), dtype, seed=70)
    G = float(x.float().abs().max()) / 20
    q, ref = check_quantize(x, G, four_over_six)
    assert (ref.scale_values == 448.0).any()
    assert (np.abs(ref.scaled) == 6.0).any()


@pytest.mark.parametrize("four_over_six", [False, True], ids=["plain", "4over6"])
@pytest.mark.parametrize("amax_kind", ["float", "tensor"])
def test_given_global_amax_zero(amax_kind, four_over_six):
    """global_amax = 0 with nonzero data uses S_enc = 1 (not inf/NaN); bit-exact."""
    x = R.normal((8, 32), torch.float32, seed=80) * 3
    ga = 0.0 if amax_kind == "float" else torch.tensor(0.0)
    q, ref = check_quantize(x, ga, four_over_six)
    assert ref.s_enc == 1.0
    assert float(q.global_amax) == 0.0
    assert torch.isfinite(q.dequantize()).all()


# --------------------------------------------------------------------------------------
# Shapes and layouts
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("four_over_six", [False, True], ids=["plain", "4over6"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_3d_input(dtype, four_over_six):
    """A 3-D input [2, 5, 48] is blocked along the last dim only; outputs keep the leading dims."""
    x = R.normal((2, 5, 48), dtype, seed=90)
    q, _ = check_quantize(x, None, four_over_six)
    assert tuple(q.data.shape) == (2, 5, 24) and tuple(q.scale.shape) == (2, 5, 3)


def _noncontiguous_views(dtype):
    base_t = R.heavy_tailed((64, 32), dtype, seed=91)
    base_s = R.normal((8, 128), dtype, seed=92)
    base_r = R.normal((12, 3, 32), dtype, seed=93)
    return {
        "transposed": base_t.t(),  # [32, 64], strides (1, 32)
        "column_slice": base_s[:, 16:80],  # [8, 64], row stride 128
        "row_step": base_r[::2, 1],  # [6, 32]
        "expanded": base_s[:1, :64].expand(4, 64),  # stride 0 rows
    }


@pytest.mark.parametrize("four_over_six", [False, True], ids=["plain", "4over6"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("view", ["transposed", "column_slice", "row_step", "expanded"])
def test_noncontiguous_input(view, dtype, four_over_six):
    """Non-contiguous views quantise exactly like their .contiguous() copy (and like the spec)."""
    x = _noncontiguous_views(dtype)[view]
    assert not x.is_contiguous()
    q, _ = check_quantize(x, None, four_over_six)
    qc = nvfp4.quantize(x.contiguous(), four_over_six=four_over_six, backend="torch")
    R.assert_equal(q.data, qc.data, "data vs contiguous")
    R.assert_equal(q.scale.view(torch.uint8), qc.scale.view(torch.uint8), "scale vs contiguous")
    R.assert_equal_bits(
        nvfp4.fake_quantize(x, four_over_six=four_over_six, backend="torch"),
        nvfp4.fake_quantize(x.contiguous(), four_over_six=four_over_six, backend="torch"),
        "fake_quantize vs contiguous",
    )


def test_auto_backend_on_cpu_is_torch():
    """backend="auto" on a CPU tensor (no Triton path possible) gives the spec's bits too."""
    x = R.heavy_tailed((8, 64), torch.bfloat16, seed=95)
    check_quantize(x, None, True, backend="auto")
    check_quantize(x, 2.5, False, backend="auto")


# --------------------------------------------------------------------------------------
# Four-over-six
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_four_over_six_picks_per_block(dtype):
    """Designed blocks: multiples of amax_b/4 must keep m=4 (scale d = 1.5 with S_enc = 1),
    E2M1-grid blocks must keep m=6 (d = 1.0); random blocks as the spec decides.  The stored
    scale bytes reveal the choice, and both choices must occur."""
    x, G, expect = R.four_over_six_case(dtype, seed=100)
    q, ref = check_quantize(x, G, True)
    chose = torch.from_numpy(ref.chose_four.copy())
    designed = expect >= 0
    assert bool((chose[designed] == (expect[designed] == 1)).all()), "reference disagrees with the design"
    assert chose.any() and (~chose).any()
    scale = q.scale.float()
    assert bool((scale[expect == 1] == 1.5).all()), f"m=4 blocks: scales {scale[expect == 1].tolist()}"
    assert bool((scale[expect == 0] == 1.0).all()), f"m=6 blocks: scales {scale[expect == 0].tolist()}"


def test_four_over_six_mixed_choice_on_random_data():
    """On normal data 4/6 keeps m=4 for some blocks and m=6 for others, and the scale bytes
    of each block equal the chosen candidate's d from the spec."""
    x = R.normal((16, 64), torch.float32, seed=101)
    q, ref = check_quantize(x, None, True)
    assert ref.chose_four.any() and (~ref.chose_four).any()


def test_four_over_six_error_summed_as_pairwise_tree():
    """Blocks found by search where the m=4 / m=6 choice flips with the summation order of
    the 16 squared errors (including exact fp32 ties, which keep m=6): the spec's fixed
    pairwise tree must be used, not a sequential fp32 sum or an fp64 sum."""
    x, G, caught = R.four_over_six_sum_order_case(seed=0)
    assert caught == set(R.SUM_ALTERNATIVES), f"search only discriminates {caught}"
    check_quantize(x, G, True)


def _block_sq_error(values: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    """Per-block sum of squared errors in fp32 with the spec's pairwise tree."""
    v = values.float().reshape(-1, 16).numpy()
    xx = x.float().reshape(-1, 16).numpy()
    out = []
    for vb, xb in zip(v, xx):
        sq = [np.float32(np.float32(a - b) * np.float32(a - b)) for a, b in zip(vb, xb)]
        out.append(R.pairwise_sum16(sq))
    return np.array(out, np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_four_over_six_never_worse_per_block(seed):
    """With the same S_enc (= 384: global amax 4 in 4/6 mode, 7 in plain mode), every 4/6
    block's squared error is <= the plain m=6 block's error (computed as the spec computes it)."""
    x = R.normal((16, 64), torch.float32, seed=200 + seed)
    fq46 = nvfp4.fake_quantize(x, 4.0, True, backend="torch")
    fq6 = nvfp4.fake_quantize(x, 7.0, False, backend="torch")
    assert R.nvfp4_reference(x[:1], 4.0, True).s_enc == R.nvfp4_reference(x[:1], 7.0, False).s_enc == 384.0
    e46, e6 = _block_sq_error(fq46, x), _block_sq_error(fq6, x)
    assert np.all(e46 <= e6), f"blocks {np.nonzero(e46 > e6)[0].tolist()} got worse with 4/6"
    assert np.any(e46 < e6), "4/6 should improve at least one block"


@pytest.mark.parametrize("seed", [0, 1])
def test_four_over_six_lower_mse_on_normal_data(seed):
    """On Gaussian data the overall MSE of 4/6 (computed amax) is below plain NVFP4's."""
    x = R.normal((64, 256), torch.float32, seed=300 + seed)
    mse46 = (nvfp4.fake_quantize(x, four_over_six=True, backend="torch") - x).double().pow(2).mean()
    mse6 = (nvfp4.fake_quantize(x, four_over_six=False, backend="torch") - x).double().pow(2).mean()
    assert mse46 < mse6, (float(mse46), float(mse6))


# --------------------------------------------------------------------------------------
# fake_quantize: equality with quantize().dequantize(), dtype/shape, gradient
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("four_over_six", [False, True], ids=["plain", "4over6"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fake_quantize_equals_quantize_dequantize(dtype, four_over_six):
    """fake_quantize(x) is bitwise quantize(x).dequantize(x.dtype), for computed and given amax."""
    x = R.heavy_tailed((4, 6, 32), dtype, seed=400)
    for ga in (None, 1.7):
        fq = nvfp4.fake_quantize(x, ga, four_over_six, backend="torch")
        dq = nvfp4.quantize(x, ga, four_over_six, backend="torch").dequantize(x.dtype)
        R.assert_equal_bits(fq, dq, "fake_quantize vs quantize().dequantize()")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fake_quantize_dtype_shape_device(dtype):
    """fake_quantize returns a tensor of x's dtype, shape and device; quantize keeps the logical
    shape and the input dtype; dequantize(dtype) honours the requested dtype."""
    x = R.normal((3, 2, 64), dtype, seed=401)
    fq = nvfp4.fake_quantize(x, backend="torch")
    assert fq.dtype == dtype and fq.shape == x.shape and fq.device == x.device
    q = nvfp4.quantize(x, backend="torch")
    assert tuple(q.shape) == tuple(x.shape) and q.dtype == dtype
    for out_dtype in DTYPES:
        assert q.dequantize(out_dtype).dtype == out_dtype
    assert nvfp4.BLOCK_SIZE == 16


@pytest.mark.parametrize("four_over_six", [False, True], ids=["plain", "4over6"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("amax", [None, 0.25])
def test_gradient_is_identity(amax, dtype, four_over_six):
    """Straight-through estimator: d/dx sum(fake_quantize(x) * g) == g exactly, including for
    saturated elements (amax 0.25 clamps most of the tensor) and zeros."""
    x = R.normal((8, 32), dtype, seed=500)
    x[0, :16] = 0
    x.requires_grad_(True)
    g = R.normal((8, 32), dtype, seed=501)
    y = nvfp4.fake_quantize(x, amax, four_over_six, backend="torch")
    assert y.requires_grad
    (y * g).sum().backward()
    assert x.grad is not None and x.grad.dtype == dtype
    R.assert_equal_bits(x.grad, g, "gradient")


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", ["quantize", "fake_quantize"])
def test_last_dim_not_multiple_of_16(fn):
    """Last dim 24: ValueError whose message mentions 16 and the offending shape (5, 24)."""
    x = torch.randn(5, 24)
    with pytest.raises(ValueError) as info:
        getattr(nvfp4, fn)(x, backend="torch")
    msg = str(info.value)
    assert "16" in msg, msg
    assert re.search(r"\b5\D{1,4}24\b", msg), msg


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int8])
def test_integer_dtype_raises_type_error(dtype):
    """Integer inputs are rejected with TypeError."""
    x = torch.ones(4, 32, dtype=dtype)
    with pytest.raises(TypeError):
        nvfp4.quantize(x, backend="torch")
    with pytest.raises(TypeError):
        nvfp4.fake_quantize(x, backend="torch")


@pytest.mark.parametrize("fn", ["quantize", "fake_quantize"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nonfinite_raises_with_shape_and_counts(dtype, fn):
    """7 NaN and 5 +Inf in a (6, 48) tensor: ValueError naming the shape and both counts;
    a NaN-only and an Inf-only tensor are rejected too (with their counts)."""
    x = torch.randn(6, 48).to(dtype)
    flat = x.view(-1)
    flat[[1, 9, 50, 51, 100, 200, 287]] = float("nan")
    flat[[3, 60, 61, 150, 250]] = float("inf")
    with pytest.raises(ValueError) as info:
        getattr(nvfp4, fn)(x, backend="torch")
    msg = str(info.value)
    assert re.search(r"\b6\D{1,4}48\b", msg), msg
    assert re.search(r"\b7\b", msg) and re.search(r"\b5\b", msg), msg

    y = torch.randn(6, 48).to(dtype)
    y.view(-1)[[4, 8, 15]] = float("nan")
    with pytest.raises(ValueError, match=r"\b3\b"):
        getattr(nvfp4, fn)(y, backend="torch")
    z = torch.randn(6, 48).to(dtype)
    z.view(-1)[[0, 1]] = float("-inf")
    with pytest.raises(ValueError, match=r"\b2\b"):
        getattr(nvfp4, fn)(z, backend="torch")


def test_triton_backend_with_cpu_tensor_raises():
    """backend="triton" requires CUDA tensors: a CPU tensor gives a clear error naming the device."""
    x = torch.randn(4, 32)
    for fn in (nvfp4.quantize, nvfp4.fake_quantize):
        with pytest.raises((ValueError, RuntimeError, TypeError)) as info:
            fn(x, backend="triton")
        assert re.search(r"cuda|cpu", str(info.value), re.IGNORECASE), str(info.value)


@pytest.mark.parametrize("backend", ["cuda", "", "triton2"])
def test_unknown_backend_raises_value_error(backend):
    """An unknown backend string is rejected with ValueError (not silently mapped to a default)."""
    x = torch.randn(4, 32)
    with pytest.raises(ValueError):
        nvfp4.quantize(x, backend=backend)
    with pytest.raises(ValueError):
        nvfp4.fake_quantize(x, backend=backend)
