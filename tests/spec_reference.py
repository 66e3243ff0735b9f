"""Slow, obviously-correct reference for the NVFP4 and FP8 E4M3 fake-quantisation spec.

This module is written from the numerics spec alone, independently of
``megatron_qad.numerics``; it does not import the package under test.  It is
meant to be read next to the spec:

* every arithmetic step is one IEEE fp32 operation on ``numpy.float32``
  scalars (no fp64 intermediates, no fused multiply-add, no vectorised
  reductions whose order could differ),
* every rounding to a small format (E2M1 element codes, FP8 E4M3 scales and
  values) enumerates the representable values and picks the nearest one,
  comparing distances *exactly* (as Python integers, see ``_exact``), with the
  tie rule spelled out; ``torch``'s float8 casts are never used here,
* the final fp32 -> bf16 / fp16 casts are done with bit arithmetic (bf16) and
  numpy's IEEE half conversion (fp16), not with torch.

Speed is not a goal: keep inputs small (a few thousand elements).

The module also holds the deterministic case generators shared by
``test_nvfp4.py`` and ``test_triton_backend.py``.
"""

from __future__ import annotations

import bisect
import dataclasses
import math

import numpy as np
import torch

F32 = np.float32
FLT_MAX = F32(np.finfo(np.float32).max)
ZERO = F32(0.0)
ONE = F32(1.0)

BLOCK = 16
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # index = 3-bit magnitude code


# --------------------------------------------------------------------------------------
# Exact comparison helper
# --------------------------------------------------------------------------------------
_EXACT_SHIFT = 2.0**149  # every finite fp32 value is an integer multiple of 2**-149


def _exact(v) -> int:
    """Return the fp32 value ``v`` times 2**149 as an exact Python integer.

    Every finite fp32 (and every E2M1 / E4M3) value is an integer multiple of
    2**-149, the smallest fp32 subnormal, and multiplying a double by a power of
    two is exact, so this integer represents ``v`` without any rounding.
    Distances between such integers are therefore exact, which makes the
    "pick the nearest" enumerations below exact as well.
    """
    f = float(v)
    assert math.isfinite(f), f
    scaled = f * _EXACT_SHIFT
    assert scaled == int(scaled), f
    return int(scaled)


# --------------------------------------------------------------------------------------
# FP8 E4M3 (fn variant): bias 7, 3 mantissa bits, no infinities, max 448
# --------------------------------------------------------------------------------------
def _build_e4m3_table():
    """All finite non-negative E4M3 values as (value, byte) pairs, sorted by value."""
    table = []
    for exp_field in range(16):
        for mant in range(8):
            if exp_field == 15 and mant == 7:
                continue  # 0x7F is NaN in the fn variant
            if exp_field == 0:
                value = mant * 2.0**-9  # subnormal: (mant / 8) * 2**(1 - 7)
            else:
                value = (1.0 + mant / 8.0) * 2.0 ** (exp_field - 7)
            table.append((value, (exp_field << 3) | mant))
    table.sort()
    return table


E4M3_TABLE = _build_e4m3_table()  # 127 entries: 0 .. 448
E4M3_VALUES = [v for v, _ in E4M3_TABLE]
E4M3_EXACT = [_exact(v) for v in E4M3_VALUES]
assert E4M3_VALUES[0] == 0.0 and E4M3_VALUES[-1] == 448.0 and len(E4M3_TABLE) == 127


def e4m3_rne(y) -> tuple[np.float32, int]:
    """Round fp32 ``y`` to the nearest FP8 E4M3 value, ties to the even mantissa.

    Returns ``(value_as_fp32, byte)``; the byte is the E4M3 bit pattern
    (sign bit 0x80).  Magnitudes above 448 saturate to 448 (callers clamp
    first anyway).  The sign of ``y`` is kept, so a small negative number that
    rounds to zero gives -0.0 (byte 0x80), as in IEEE rounding.

    Only the two neighbours of |y| in the sorted value table can be nearest, so
    the enumeration is done with a bisection; the distances are compared
    exactly.  Adjacent table entries have consecutive bit patterns, so on a tie
    exactly one of the two has an even mantissa (even byte).
    """
    y = F32(y)
    negative = bool(np.signbit(y))
    mag = abs(y)
    if float(mag) >= 448.0:
        value, byte = E4M3_TABLE[-1]
    else:
        m = _exact(mag)
        i = bisect.bisect_right(E4M3_EXACT, m)  # E4M3_EXACT[i-1] <= m < E4M3_EXACT[i]
        lo_v, lo_b = E4M3_TABLE[i - 1]
        hi_v, hi_b = E4M3_TABLE[i]
        d_lo = m - E4M3_EXACT[i - 1]
        d_hi = E4M3_EXACT[i] - m
        if d_lo < d_hi:
            value, byte = lo_v, lo_b
        elif d_hi < d_lo:
            value, byte = hi_v, hi_b
        else:  # exact tie: the even bit pattern wins
            value, byte = (lo_v, lo_b) if lo_b % 2 == 0 else (hi_v, hi_b)
    out = F32(value)
    if negative:
        out = -out
        byte |= 0x80
    return out, byte


# --------------------------------------------------------------------------------------
# E2M1
# --------------------------------------------------------------------------------------
E2M1_EXACT = [_exact(c) for c in E2M1_MAGNITUDES]


def e2m1_code(v) -> int:
    """4-bit E2M1 code of the fp32 value ``v`` (already clamped to [-6, 6]).

    Magnitude: the nearest of the 8 magnitudes, ties to the even 3-bit index.
    Sign bit (bit 3): set iff ``v < 0`` (so -0.0 gives code 0 while a small
    negative value rounding to magnitude 0 gives code 8).
    """
    v = F32(v)
    assert -6.0 <= float(v) <= 6.0, v
    m = _exact(abs(v))
    best = None
    for idx, c in enumerate(E2M1_EXACT):
        dist = abs(m - c)
        if best is None or dist < best[0] or (dist == best[0] and idx % 2 == 0):
            best = (dist, idx)
    idx = best[1]
    return idx | (8 if float(v) < 0.0 else 0)


def e2m1_value(code: int) -> np.float32:
    """fp32 value of a 4-bit E2M1 code; code 8 is -0.0."""
    mag = F32(E2M1_MAGNITUDES[code & 7])
    return -mag if code & 8 else mag


# --------------------------------------------------------------------------------------
# fp32 -> input dtype casts (round to nearest even), without torch
# --------------------------------------------------------------------------------------
def _fp32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """Round fp32 array to bf16 (RNE) and return the bf16 bit patterns (uint16)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    assert np.all(np.isfinite(a))
    lsb = (u >> 16) & 1
    rounded = (u + 0x7FFF + lsb) >> 16
    return rounded.astype(np.uint16)


def cast_from_fp32(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Cast an fp32 numpy array to a torch tensor of ``dtype`` with round-to-nearest-even."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if dtype == torch.float32:
        return torch.from_numpy(a.copy())
    if dtype == torch.float16:
        return torch.from_numpy(a.astype(np.float16))  # IEEE RNE conversion
    if dtype == torch.bfloat16:
        bits = _fp32_to_bf16_bits(a).view(np.int16)
        return torch.from_numpy(bits.copy()).view(torch.bfloat16)
    raise TypeError(f"unsupported dtype {dtype}")


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------
def _as_fp32_scalar(a) -> np.float32:
    """A Python float or 0-dim tensor as an fp32 scalar (Python floats: RNE to fp32)."""
    if isinstance(a, torch.Tensor):
        assert a.dim() == 0
        return F32(a.detach().to("cpu", torch.float32).item())
    return F32(a)  # numpy rounds a double to the nearest fp32 (ties to even)


def _x_as_fp32_rows(x: torch.Tensor) -> np.ndarray:
    """x (any float dtype / device / layout) as an fp32 numpy array of shape [rows, K] (exact)."""
    a = x.detach().to("cpu").to(torch.float32).contiguous().numpy()
    return a.reshape(-1, x.shape[-1])


def pairwise_sum16(terms) -> np.float32:
    """Sum 16 fp32 values as the fixed pairwise tree over adjacent pairs (four levels)."""
    level = [F32(t) for t in terms]
    assert len(level) == 16
    while len(level) > 1:
        level = [F32(level[2 * i] + level[2 * i + 1]) for i in range(len(level) // 2)]
    return level[0]


def _amax_fp32(rows: np.ndarray) -> np.float32:
    """max |x| over all elements, in fp32 (exact: abs and max do not round)."""
    best = ZERO
    for v in rows.reshape(-1):
        a = abs(F32(v))
        if a > best:
            best = a
    return best


# --------------------------------------------------------------------------------------
# NVFP4 reference
# --------------------------------------------------------------------------------------
@dataclasses.dataclass
class NVFP4Ref:
    shape: tuple
    dtype: torch.dtype
    global_amax: np.float32
    s_enc: np.float32
    s_dec: np.float32
    codes: np.ndarray  # uint8 [..., K], one 4-bit code per element
    data: np.ndarray  # uint8 [..., K/2], packed (element 2i low nibble)
    scale_bits: np.ndarray  # uint8 [..., K/16], E4M3 byte of the chosen decode scale d
    scale_values: np.ndarray  # float32 [..., K/16], the chosen d
    scale_inputs: np.ndarray  # float32 [..., K/16], the value fed to e4m3_rne for the m=6 candidate
    scaled: np.ndarray  # float32 [..., K], the clamped scaled value v of the chosen candidate
    values_fp32: np.ndarray  # float32 [..., K], dequantised value before the cast to dtype
    chose_four: np.ndarray  # bool [..., K/16], True where 4/6 kept the m=4 candidate
    err6: np.ndarray  # float32 [..., K/16], 4/6 only: block error of the m=6 candidate
    err4: np.ndarray  # float32 [..., K/16], 4/6 only: block error of the m=4 candidate

    @property
    def values(self) -> torch.Tensor:
        """Dequantised values cast to the input dtype (RNE), shape == input shape."""
        return cast_from_fp32(self.values_fp32, self.dtype)

    def data_tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.data.copy())

    def scale_bits_tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.scale_bits.copy())


def _quantize_block(xb, s_enc, s_dec, m):
    """Quantise one block (16 fp32 values) with mapped max ``m``; spec step 3.

    Returns (d, d_byte, scale_input, codes, scaled, values_fp32).
    """
    with np.errstate(over="ignore", divide="ignore", under="ignore", invalid="raise"):
        amax_b = ZERO
        for v in xb:
            if abs(v) > amax_b:
                amax_b = abs(v)
        t = F32(amax_b / F32(m))
        t = F32(t * s_enc)
        t = min(t, FLT_MAX)
        scale_input = min(t, F32(448.0))
        d, d_byte = e4m3_rne(scale_input)
        e = F32(ONE / F32(F32(d) * s_dec))
        e = min(e, FLT_MAX)
        codes, scaled, values = [], [], []
        for v in xb:
            w = F32(F32(v) * e)
            w = min(max(w, F32(-6.0)), F32(6.0))
            code = e2m1_code(w)
            val = F32(F32(e2m1_value(code) * d) * s_dec)
            codes.append(code)
            scaled.append(w)
            values.append(val)
    return d, d_byte, scale_input, codes, scaled, values


def _block_error(values, xb) -> np.float32:
    """Spec step 4: sum over the block of (value - x)^2 in fp32, fixed pairwise tree."""
    with np.errstate(over="ignore", under="ignore"):
        sq = []
        for val, v in zip(values, xb):
            diff = F32(F32(val) - F32(v))
            sq.append(F32(diff * diff))
        return pairwise_sum16(sq)


def nvfp4_reference(x: torch.Tensor, global_amax=None, four_over_six: bool = False) -> NVFP4Ref:
    """NVFP4 quantisation of ``x`` exactly as the spec describes (slow)."""
    K = x.shape[-1]
    assert K % BLOCK == 0
    rows = _x_as_fp32_rows(x)
    assert np.all(np.isfinite(rows))
    e4m3_max = F32(256.0) if four_over_six else F32(448.0)

    # Step 1: tensor amax.
    amax = _amax_fp32(rows) if global_amax is None else _as_fp32_scalar(global_amax)
    # Step 2: global encode / decode scales.
    with np.errstate(over="ignore", divide="ignore"):
        s_enc = F32(F32(F32(6.0) * e4m3_max) / amax) if amax != 0 else F32(np.inf)
        s_enc = min(s_enc, FLT_MAX)
        if amax == 0 or s_enc == 0:
            s_enc = ONE
        s_dec = F32(ONE / s_enc)

    R, nb = rows.shape[0], K // BLOCK
    codes = np.zeros((R, K), np.uint8)
    scaled = np.zeros((R, K), np.float32)
    values = np.zeros((R, K), np.float32)
    scale_bits = np.zeros((R, nb), np.uint8)
    scale_values = np.zeros((R, nb), np.float32)
    scale_inputs = np.zeros((R, nb), np.float32)
    chose_four = np.zeros((R, nb), bool)
    err6 = np.zeros((R, nb), np.float32)
    err4 = np.zeros((R, nb), np.float32)
    for r in range(R):
        for b in range(nb):
            xb = [F32(v) for v in rows[r, b * BLOCK : (b + 1) * BLOCK]]
            cand = _quantize_block(xb, s_enc, s_dec, 6.0)
            scale_inputs[r, b] = cand[2]
            if four_over_six:
                cand4 = _quantize_block(xb, s_enc, s_dec, 4.0)
                e6 = _block_error(cand[5], xb)
                e4 = _block_error(cand4[5], xb)
                err6[r, b], err4[r, b] = e6, e4
                if e4 < e6:  # strictly smaller; ties keep m = 6
                    cand = cand4
                    chose_four[r, b] = True
            d, d_byte, _, c, w, val = cand
            sl = slice(b * BLOCK, (b + 1) * BLOCK)
            codes[r, sl] = c
            scaled[r, sl] = w
            values[r, sl] = val
            scale_bits[r, b] = d_byte
            scale_values[r, b] = d
    data = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)

    lead = tuple(x.shape[:-1])
    return NVFP4Ref(
        shape=tuple(x.shape),
        dtype=x.dtype,
        global_amax=amax,
        s_enc=s_enc,
        s_dec=s_dec,
        codes=codes.reshape(lead + (K,)),
        data=data.reshape(lead + (K // 2,)),
        scale_bits=scale_bits.reshape(lead + (nb,)),
        scale_values=scale_values.reshape(lead + (nb,)),
        scale_inputs=scale_inputs.reshape(lead + (nb,)),
        scaled=scaled.reshape(lead + (K,)),
        values_fp32=values.reshape(lead + (K,)),
        chose_four=chose_four.reshape(lead + (nb,)),
        err6=err6.reshape(lead + (nb,)),
        err4=err4.reshape(lead + (nb,)),
    )


# --------------------------------------------------------------------------------------
# FP8 E4M3 per-tensor fake quantisation reference
# --------------------------------------------------------------------------------------
def fp8_e4m3_reference(x: torch.Tensor, amax) -> torch.Tensor:
    """Spec step 5: (e4m3_rne(clamp(x * s, -448, 448)) / s) cast to x's dtype."""
    a = _as_fp32_scalar(amax)
    with np.errstate(over="ignore", divide="ignore"):
        s = F32(F32(448.0) / a) if a != 0 else F32(np.inf)
        s = min(s, FLT_MAX)
        if a == 0 or s == 0:
            s = ONE
        flat = x.detach().to("cpu").to(torch.float32).contiguous().numpy().reshape(-1)
        out = np.zeros(flat.shape, np.float32)
        for i, v in enumerate(flat):
            w = F32(F32(v) * s)
            w = min(max(w, F32(-448.0)), F32(448.0))
            q, _ = e4m3_rne(w)
            out[i] = F32(q / s)
    return cast_from_fp32(out.reshape(tuple(x.shape)), x.dtype)


# --------------------------------------------------------------------------------------
# Bitwise comparison helpers
# --------------------------------------------------------------------------------------
_INT_VIEW = {
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float8_e4m3fn: torch.uint8,
}


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns of a float tensor (on CPU, contiguous) so that -0.0 != 0.0."""
    t = t.detach().to("cpu").contiguous()
    return t.view(_INT_VIEW[t.dtype])


def first_mismatch(actual: torch.Tensor, expected: torch.Tensor, what: str) -> str | None:
    """None if equal; otherwise a message naming the count and the first differing index."""
    actual = actual.detach().to("cpu")
    expected = expected.detach().to("cpu")
    if actual.shape != expected.shape:
        return f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    if actual.dtype != expected.dtype:
        return f"{what}: dtype {actual.dtype} != expected {expected.dtype}"
    neq = actual != expected
    if not bool(neq.any()):
        return None
    idx = tuple(int(i) for i in neq.nonzero()[0])
    msg = (
        f"{what}: {int(neq.sum())} of {neq.numel()} entries differ; first at {idx}: "
        f"got {actual[idx].item()!r}, expected {expected[idx].item()!r}"
    )
    return msg


def assert_equal_bits(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Assert two float tensors have identical dtype, shape and bit patterns."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    msg = first_mismatch(bits(actual), bits(expected), what)
    if msg is not None:
        a = actual.detach().cpu().reshape(-1)
        e = expected.detach().cpu().reshape(-1)
        i = int((bits(actual).reshape(-1) != bits(expected).reshape(-1)).nonzero()[0])
        msg += f" (values: got {a[i].item()!r}, expected {e[i].item()!r})"
    assert msg is None, msg


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Assert two integer tensors are equal (same shape and dtype)."""
    msg = first_mismatch(actual, expected, what)
    assert msg is None, msg


# --------------------------------------------------------------------------------------
# Deterministic case generators (shared by the CPU and GPU test files)
# --------------------------------------------------------------------------------------
def _gen(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def normal(shape, dtype=torch.float32, seed=0, std=1.0, device="cpu") -> torch.Tensor:
    """Standard normal data (times ``std``), generated on CPU in fp32 then cast."""
    x = torch.randn(shape, generator=_gen(seed), dtype=torch.float32) * std
    return x.to(dtype).to(device)


def heavy_tailed(shape, dtype=torch.float32, seed=0, device="cpu") -> torch.Tensor:
    """Heavy-tailed data: half Student-t (2 d.o.f.), half Cauchy, clipped to +-3e4 (finite in fp16)."""
    g = _gen(seed)
    z = torch.randn(shape, generator=g)
    a = torch.randn(shape, generator=g)
    b = torch.randn(shape, generator=g)
    student_t2 = z / torch.sqrt((a * a + b * b) / 2).clamp_min(1e-20)
    cauchy = a / b.abs().clamp_min(1e-20) * torch.sign(b)
    pick = torch.rand(shape, generator=g) < 0.5
    x = torch.where(pick, student_t2, cauchy).clamp(-3e4, 3e4)
    return x.to(dtype).to(device)


def _shuffle_within_blocks(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Randomly permute the elements inside every block of 16 (same permutation per block)."""
    rows = x.reshape(-1, BLOCK)
    out = torch.empty_like(rows)
    for i in range(rows.shape[0]):
        out[i] = rows[i][torch.randperm(BLOCK, generator=g)]
    return out.reshape(x.shape)


# Scaled values that are exact E2M1 rounding ties, and where each must go.
E2M1_TIES = {0.25: 0.0, 0.75: 1.0, 1.25: 1.0, 1.75: 2.0, 2.5: 2.0, 3.5: 4.0, 5.0: 4.0}


def ties_case(k: int, four_over_six: bool, dtype=torch.float32, rows=8, cols=64, seed=0, device="cpu"):
    """A tensor whose scaled values land exactly on every E2M1 rounding tie.

    The global amax G is chosen so that S_enc = 2**k exactly (G = 6 * E4M3_MAX * 2**-k).
    Block number n (row-major) is scaled by 2**j with j = n % 8 - 3 and contains
    6 * 2**j (or -6 * 2**j), so for the m = 6 candidate d = e4m3(2**(j + k)) is an exact
    power of two, S_dec * d = 2**j and every scaled value is exactly
    one of 0.25, 0.75, ..., 5.0 and their negatives.  The 16th slot cycles through
    -0.0, a small negative number that rounds to code 8, +0.0 and -6.
    Returns (x, global_amax).
    """
    assert cols % BLOCK == 0
    e4m3_max = 256.0 if four_over_six else 448.0
    G = 6.0 * e4m3_max * 2.0**-k
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    extras = [-0.0, -0.1, 0.0, -6.0]
    g = _gen(seed)
    blocks = []
    for n in range(rows * cols // BLOCK):
        j = n % 8 - 3
        top = 6.0 if n % 2 == 0 else -6.0
        vals = [top] + ties + [-t for t in ties] + [extras[n % 4]]
        blk = torch.tensor(vals, dtype=torch.float32) * 2.0**j
        blocks.append(blk)
    x = torch.cat(blocks).reshape(rows, cols)
    x = _shuffle_within_blocks(x, g)
    return x.to(dtype).to(device), G


# Values t fed to e4m3_rne (block amax / 6 * S_enc with S_enc = 1) that are exact E4M3 ties,
# together with the value they must round to (ties to the even mantissa).
E4M3_SCALE_TIES = {
    1.0625: 1.0,  # between 1.0 (m=000) and 1.125 (m=001)
    1.1875: 1.25,  # between 1.125 (m=001) and 1.25 (m=010)
    2.0**-10: 0.0,  # half the smallest subnormal: ties to zero
    3 * 2.0**-10: 2.0**-8,  # between 2**-9 (m=001) and 2**-8 (m=010)
    5 * 2.0**-10: 2.0**-8,  # between 2**-8 (m=010) and 3 * 2**-9 (m=011)
    248.0: 256.0,  # between 240 (0x77, m=111) and 256 (0x78, next binade, m=000)
    432.0: 448.0,  # between 416 (m=101) and 448 (m=110)
    0.01: None,  # not a tie (control)
}


def scale_ties_case(four_over_six: bool, dtype=torch.float32, reps=2, seed=0, device="cpu"):
    """Blocks whose FP8 block scale input (amax_b / 6) * S_enc is exactly an E4M3 tie.

    G = 6 * E4M3_MAX so S_enc = 1; block amax is 6 * t for each t in E4M3_SCALE_TIES;
    the other 15 elements are uniform in (-6t, 6t).  Returns (x, global_amax).
    """
    e4m3_max = 256.0 if four_over_six else 448.0
    G = 6.0 * e4m3_max
    g = _gen(seed)
    blocks = []
    for _ in range(reps):
        for t in E4M3_SCALE_TIES:
            top = 6.0 * t
            rest = (torch.rand(BLOCK - 1, generator=g) * 2 - 1) * top * 0.999
            sign = -1.0 if torch.rand(1, generator=g).item() < 0.5 else 1.0
            blk = torch.cat([torch.tensor([sign * top]), rest])
            blocks.append(blk)
    x = torch.stack(blocks)  # [n_blocks, 16]
    x = _shuffle_within_blocks(x, g).reshape(-1, 2 * BLOCK)  # two blocks per row
    return x.to(dtype).to(device), G


def zero_blocks_case(dtype=torch.float32, rows=8, cols=64, seed=0, device="cpu"):
    """Normal data where every third block is all zeros (with some -0.0 entries)."""
    x = torch.randn(rows, cols, generator=_gen(seed))
    blocks = x.reshape(-1, BLOCK)
    for n in range(0, blocks.shape[0], 3):
        blocks[n] = 0.0
        blocks[n, 1::3] = -0.0
    return blocks.reshape(rows, cols).to(dtype).to(device)


def underflow_case(dtype=torch.float32, rows=8, cols=64, seed=0, device="cpu"):
    """Blocks spanning 10 decades below a 1e3 tensor max.

    Block n has magnitude about 1e3 * 10**-(n % 10), so with S_enc = 2688 / 1e3 the FP8
    block scale is normal for the large blocks, subnormal for the middle ones, and
    underflows to 0 for the tiny ones (e.g. 1e-6 next to 1e3).  Each block has mixed signs.
    """
    g = _gen(seed)
    x = torch.randn(rows, cols, generator=g)
    blocks = x.reshape(-1, BLOCK)
    for n in range(blocks.shape[0]):
        blocks[n] = blocks[n] / blocks[n].abs().max() * 10.0 ** (3 - n % 10)
    blocks[0, 0] = 1e3
    return blocks.reshape(rows, cols).to(dtype).to(device)


def four_over_six_case(dtype=torch.float32, seed=0, device="cpu"):
    """Blocks designed so that 4/6 keeps m=4 for some and m=6 for others, plus normal blocks.

    G = 1536 (S_enc = 1 in 4/6 mode).  "Four" blocks hold multiples of amax_b / 4
    (exact on the m = 4 grid; on the m = 6 grid 4.5 rounds to 4);
    "six" blocks hold E2M1 grid points times amax_b / 6 (exact on the m = 6 grid).
    Returns (x [6, 64], global_amax, expected_choice) where expected_choice is an int
    tensor [6, 4]: 1 = the block must keep m=4, 0 = it must keep m=6, -1 = random block.
    """
    g = _gen(seed)
    four_vals = torch.tensor([1.0, 2.0, 3.0, 4.0] * 4)  # times amax_b / 4
    six_vals = torch.tensor([0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 6.0] * 2)  # times amax_b / 6
    blocks, expect = [], []
    for n in range(24):
        kind = n % 3
        signs = torch.where(torch.rand(BLOCK, generator=g) < 0.5, -1.0, 1.0)
        if kind == 0:
            blk = four_vals * (6.0 / 4.0) * signs  # amax_b = 6, S_enc = 1: d4 = 1.5, d6 = 1
            expect.append(1)
        elif kind == 1:
            blk = six_vals * signs  # amax_b = 6: d6 = 1
            expect.append(0)
        else:
            blk = torch.randn(BLOCK, generator=g) * 2.0
            expect.append(-1)
        blocks.append(blk[torch.randperm(BLOCK, generator=g)])
    x = torch.stack(blocks).reshape(6, 4 * BLOCK)
    return x.to(dtype).to(device), 1536.0, torch.tensor(expect).reshape(6, 4)


def signed_underflow_case(dtype=torch.float32, seed=0, device="cpu"):
    """Blocks holding tiny negative (and positive) numbers next to a large block max.

    The element scale e = 1 / (d * S_dec) is far below 1 here, so x * e underflows to -0.0
    for the tiny negatives: by the spec their scaled value is not < 0 and their code is 0
    (not 8), and they dequantise to +0.0.  fp32 uses +-2**-149 next to 100, bf16 +-2**-133
    next to 1e6 (fp16 cannot hold such a range).
    """
    if dtype == torch.float32:
        big, tiny = 100.0, 2.0**-149
    elif dtype == torch.bfloat16:
        big, tiny = 1e6, 2.0**-133
    else:
        raise ValueError("signed_underflow_case supports fp32 and bf16")
    g = _gen(seed)
    x = torch.randn(8, 64, generator=g) * big / 4
    blocks = x.reshape(-1, BLOCK)
    for n in range(blocks.shape[0]):
        blocks[n, 0] = big if n % 2 else -big
        blocks[n, 1:5] = torch.tensor([-tiny, -3 * tiny, tiny, -tiny])
    x = _shuffle_within_blocks(blocks.reshape(8, 64), g)
    return x.to(dtype).to(device), None


def _f32_preimages(target, fn, start, span=256):
    """All fp32 a within +-span ulps of ``start`` with fn(a) == target (fn maps fp32 -> fp32)."""
    out = []
    a = F32(start)
    lo = a
    for _ in range(span):
        lo = np.nextafter(lo, F32(-np.inf), dtype=np.float32)
    a = lo
    for _ in range(2 * span):
        if fn(a) == target:
            out.append(a)
        a = np.nextafter(a, F32(np.inf), dtype=np.float32)
    return out


def scale_order_case(four_over_six: bool, seed=0, device="cpu"):
    """fp32 blocks whose FP8 scale input ((amax_b / 6) * S_enc, that order) is exactly an E4M3
    midpoint for a non-trivial S_enc, chosen so that the other association orders
    (amax_b * (S_enc / 6) and (amax_b * S_enc) / 6) do NOT land on the midpoint.  An
    implementation that reassociates these two fp32 operations then rounds the block scale
    differently.  Returns (x, global_amax, ties) with ties the list of midpoints used.
    """
    e4m3_max = F32(256.0) if four_over_six else F32(448.0)
    g = _gen(seed)
    G = F32(3.0 + 40.0 * torch.rand(1, generator=g).item())
    s_enc = F32(F32(F32(6.0) * e4m3_max) / G)
    six = F32(6.0)

    def spec(a):
        return F32(F32(a / six) * s_enc)

    def alt1(a):
        return F32(a * F32(s_enc / six))

    def alt2(a):
        return F32(F32(a * s_enc) / six)

    rows, ties = [], []
    mids = [(E4M3_VALUES[i] + E4M3_VALUES[i + 1]) / 2 for i in range(len(E4M3_VALUES) - 1)]
    for t in mids[::3] + [mids[0], mids[8]]:
        tt = F32(t)
        start = F32(6.0 * t / float(s_enc))
        if float(start) > float(G):  # keep amax_b <= G so nothing saturates
            continue
        pre = _f32_preimages(tt, spec, start, span=64)
        good = [a for a in pre if alt1(a) != tt and alt2(a) != tt]
        good = good or [a for a in pre if alt1(a) != tt or alt2(a) != tt]
        if not good:
            continue
        a = good[len(good) // 2]
        rest = (torch.rand(BLOCK - 1, generator=g) * 2 - 1) * float(a) * 0.99
        sign = -1.0 if torch.rand(1, generator=g).item() < 0.5 else 1.0
        rows.append(torch.cat([torch.tensor([sign * float(a)]), rest]))
        ties.append(float(tt))
    while len(rows) % 4:
        rows.append(torch.randn(BLOCK, generator=g))
    x = _shuffle_within_blocks(torch.stack(rows), g).reshape(-1, 4 * BLOCK)
    return x.to(device), float(G), ties


def _block_pieces(xb, s_enc, s_dec):
    """(values6, values4) fp32 lists for a block, via the reference's block quantiser."""
    v6 = _quantize_block(xb, s_enc, s_dec, 6.0)[5]
    v4 = _quantize_block(xb, s_enc, s_dec, 4.0)[5]
    return v6, v4


def _sq_terms(values, xb):
    out = []
    with np.errstate(over="ignore", under="ignore"):
        for val, v in zip(values, xb):
            diff = F32(F32(val) - F32(v))
            out.append(F32(diff * diff))
    return out


def _sum_sequential(terms):
    acc = F32(terms[0])
    for t in terms[1:]:
        acc = F32(acc + F32(t))
    return acc


def _sum_fp64(terms):
    return F32(sum(float(t) for t in terms))


# torch.sum is deliberately not an alternative here: its order depends on the CPU's vector
# width, and the generated case must be the same on every machine.
SUM_ALTERNATIVES = {"sequential": _sum_sequential, "fp64": _sum_fp64}


def _decisions(xb, s_enc, s_dec):
    """{order name: keeps m=4?} for the spec's pairwise tree and the alternative sum orders."""
    v6, v4 = _block_pieces(xb, s_enc, s_dec)
    t6, t4 = _sq_terms(v6, xb), _sq_terms(v4, xb)
    out = {"pairwise": bool(pairwise_sum16(t4) < pairwise_sum16(t6))}
    for name, fn in SUM_ALTERNATIVES.items():
        out[name] = bool(fn(t4) < fn(t6))
    return out


_SUM_ORDER_CACHE = {}


def four_over_six_sum_order_case(seed=0, max_blocks=6, device="cpu"):
    """fp32 blocks on which the 4/6 choice depends on how the 16 squared errors are summed.

    Search (deterministic): take a random block, vary one non-max element x_i, locate a value
    where the m=4 / m=6 decision flips, and scan the fp32 values around it for ones where the
    spec's pairwise fp32 tree decides differently from a sequential fp32 sum or an fp64 sum.
    With S_enc = 1536 / G for a fixed G.  Returns
    (x [rows, 64] fp32, G, discriminated: set of alternative names some block catches).
    """
    key = (seed, max_blocks)
    if key not in _SUM_ORDER_CACHE:
        _SUM_ORDER_CACHE[key] = _four_over_six_sum_order_search(seed, max_blocks)
    x, G, caught = _SUM_ORDER_CACHE[key]
    return x.clone().to(device), G, set(caught)


def _four_over_six_sum_order_search(seed, max_blocks):
    g = _gen(seed)
    G = F32(4.25)
    s_enc = F32(F32(1536.0) / G)
    s_dec = F32(ONE / s_enc)
    found, caught = [], set()
    for _trial in range(200):
        if len(found) >= max_blocks:
            break
        base = [F32(v) for v in (torch.randn(BLOCK, generator=g) * 1.2).clamp(-4.2, 4.2).tolist()]
        amax_i = int(np.argmax([abs(float(v)) for v in base]))
        for i in torch.randperm(BLOCK, generator=g).tolist()[:4]:
            if i == amax_i:
                continue
            bound = float(abs(base[amax_i])) * 0.98
            grid = np.linspace(-bound, bound, 97).astype(np.float32)

            def decide(v, i=i):
                xb = list(base)
                xb[i] = F32(v)
                return _decisions(xb, s_enc, s_dec)

            prev = decide(grid[0])["pairwise"]
            for a, b in zip(grid[:-1], grid[1:]):
                cur = decide(b)["pairwise"]
                if cur == prev:
                    continue
                prev = cur
                lo, hi = F32(a), F32(b)  # decision differs between lo and hi: bisect in fp32
                d_lo = decide(lo)["pairwise"]
                while np.nextafter(lo, hi, dtype=np.float32) != hi:
                    mid = F32((float(lo) + float(hi)) / 2)
                    if mid == lo or mid == hi:
                        break
                    if decide(mid)["pairwise"] == d_lo:
                        lo = mid
                    else:
                        hi = mid
                v = lo
                for _ in range(24):
                    v = np.nextafter(v, F32(-np.inf), dtype=np.float32)
                for _ in range(48):
                    dec = decide(v)
                    new = {k for k in SUM_ALTERNATIVES if dec[k] != dec["pairwise"]} - caught
                    if new:
                        xb = list(base)
                        xb[i] = v
                        found.append(xb)
                        caught |= new
                        break
                    v = np.nextafter(v, F32(np.inf), dtype=np.float32)
                if len(found) >= max_blocks or caught == set(SUM_ALTERNATIVES):
                    break
            if len(found) >= max_blocks or caught == set(SUM_ALTERNATIVES):
                break
        if caught == set(SUM_ALTERNATIVES):
            break
    rows = [torch.tensor([float(v) for v in xb], dtype=torch.float32) for xb in found]
    while len(rows) % 4:
        rows.append(torch.randn(BLOCK, generator=g))
    x = torch.stack(rows).reshape(-1, 4 * BLOCK)
    return x, float(G), caught
