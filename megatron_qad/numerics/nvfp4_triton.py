"""Fused NVFP4 / Four Over Six quantization kernel for CUDA GPUs (Triton).

One pass over x (after the tensor amax, which ``nvfp4`` computes with ``numerics.amax`` when the
caller does not give it) computes every block's FP8 scale, rounds to E2M1 and writes either the
dequantized values (fake quant) or the packed codes and scales. Bits equal ``nvfp4_torch``:
divisions are IEEE round-to-nearest (``div_rn``; Triton's ``/`` is approximate), fp32 mul/add are
never fused into FMAs (``enable_fp_fusion=False``), and the Four Over Six error is summed in the
same adjacent-pair tree.
"""

import torch
import triton
import triton.language as tl

from .formats import BLOCK_SIZE, E4M3_MAX, FOUR_OVER_SIX_E4M3_MAX, FLT_MAX

_BLOCKS_PER_PROGRAM = 128  # NVFP4 blocks (x16 elements) per program, one per thread of the 4 warps;
# from benchmarks/sweep_nvfp4_kernels.py
_NUM_WARPS = 4
_FLT_MAX = tl.constexpr(FLT_MAX)
_E4M3_MAX = tl.constexpr(E4M3_MAX)

# A tile of BLOCKS blocks is held as two fp32 halves [BLOCKS, 8] (elements 0-7 and 8-15 of each
# block): loaded as two 8-element vectors per block (16 bytes each in bf16), they give every block
# to one thread, so the block's amax, scale and Four Over Six choice are computed once, without
# cross-lane shuffles.


@triton.jit
def _load_halves(ptr, rows, mask):
    """Blocks ``rows`` (int64 [B]) of the 16-element blocks at ``ptr`` as fp32 halves [B, 8], [B, 8]."""
    offsets = rows[:, None] * 16 + tl.arange(0, 8)[None, :]
    low = tl.load(ptr + offsets, mask=mask[:, None], other=0.0).to(tl.float32)
    high = tl.load(ptr + offsets + 8, mask=mask[:, None], other=0.0).to(tl.float32)
    return low, high


@triton.jit
def _store_halves(ptr, rows, mask, low, high):
    """Store the halves [B, 8] as blocks ``rows`` of ``ptr`` (in its element type)."""
    offsets = rows[:, None] * 16 + tl.arange(0, 8)[None, :]
    tl.store(ptr + offsets, low.to(ptr.dtype.element_ty), mask=mask[:, None])
    tl.store(ptr + offsets + 8, high.to(ptr.dtype.element_ty), mask=mask[:, None])


@triton.jit
def _pairwise_sum_8(t, BLOCKS: tl.constexpr):
    """fp32 [BLOCKS, 8] -> [BLOCKS], summing adjacent pairs level by level. A block's 16-element
    tree (``formats.pairwise_sum_16``) is the sum of its two halves' trees."""
    a, b = tl.split(tl.reshape(t, [BLOCKS, 4, 2]))
    a, b = tl.split(tl.reshape(a + b, [BLOCKS, 2, 2]))
    a, b = tl.split(a + b)
    return a + b


@triton.jit
def _block_scales(block_amax, MAPPED_MAX: tl.constexpr, s_enc, s_dec):
    """Each block's FP8 decode scale [B] with its amax mapped to ``MAPPED_MAX`` (6, or 4), the
    scale in fp32, and the element scale ``min(1 / (scale * S_dec), FLT_MAX)``."""
    if MAPPED_MAX == 4.0:
        ratio = block_amax * 0.25  # == div_rn(block_amax, 4): both round the same real number
    else:
        ratio = tl.math.div_rn(block_amax, MAPPED_MAX)
    scales = tl.minimum(ratio * s_enc, _E4M3_MAX).to(tl.float8e4nv, fp_downcast_rounding="rtne")
    scales_f32 = scales.to(tl.float32)
    element_scale = tl.minimum(tl.math.div_rn(1.0, scales_f32 * s_dec), _FLT_MAX)
    return scales, scales_f32, element_scale


@triton.jit
def _quantize_half(magnitude, scales_f32, element_scale, s_dec):
    """Quantize |x| (fp32 [B, 8]) with per-block scales [B].

    Returns the scaled magnitudes ``min(|x| * e, 6)`` (0 where x * e underflows, which decides
    the sign bit), the E2M1 magnitudes they round to, and the dequantized magnitudes
    ``(q * d) * S_dec`` (fp32 [B, 8] each). Rounding is sign-symmetric, so working on |x| and
    applying the sign afterwards gives the same bits as the signed formula.
    """
    scaled = tl.minimum(magnitude * element_scale[:, None], 6.0)
    # E2M1 round to nearest even: the grid step is 0.5 below 2, 1 below 4 and 2 up to 6. Adding
    # 2^22, 2^23 or 2^24 (whose fp32 ulp is that step) rounds to the grid with ties to the even
    # multiple, which is the even E2M1 code; subtracting it again is exact. The constant is
    # 2^22 times the power of two of scaled's binade (its exponent bits), at least 2^22.
    binade = (scaled.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    magic = tl.maximum(binade * 4194304.0, 4194304.0)
    rounded = (scaled + magic) - magic
    values = rounded * scales_f32[:, None] * s_dec
    return scaled, rounded, values


@triton.jit
def _magnitude_code(rounded):
    """3-bit E2M1 magnitude index (int32) of the rounded magnitudes: 2q for q < 2, q + 2 for
    q in {2, 3}, q / 2 + 4 for q in {4, 6}."""
    return tl.where(rounded < 2.0, rounded * 2.0,
                    tl.where(rounded < 4.0, rounded + 2.0, rounded * 0.5 + 4.0)).to(tl.int32)


@triton.jit
def _quantize_tile(low, high, amax, SCALE_MAX: tl.constexpr, FOUR_OVER_SIX: tl.constexpr, BLOCKS: tl.constexpr):
    """Quantize the blocks held as fp32 halves ``low``, ``high`` [BLOCKS, 8] with the tensor amax.

    Returns the FP8 scales [BLOCKS], then per half: the rounded E2M1 magnitudes, the dequantized
    magnitudes (fp32 [BLOCKS, 8]) and which elements carry the sign bit (bool [BLOCKS, 8]).
    """
    s_enc = tl.minimum(tl.math.div_rn(6.0 * SCALE_MAX, amax), _FLT_MAX)
    s_enc = tl.where((amax == 0.0) | (s_enc == 0.0), 1.0, s_enc)
    s_dec = tl.math.div_rn(1.0, s_enc)

    mag_low = tl.abs(low)
    mag_high = tl.abs(high)
    block_amax = tl.maximum(tl.max(mag_low, axis=1), tl.max(mag_high, axis=1))
    scales, scales_f32, element_scale = _block_scales(block_amax, 6.0, s_enc, s_dec)
    scaled_low, rounded_low, values_low = _quantize_half(mag_low, scales_f32, element_scale, s_dec)
    scaled_high, rounded_high, values_high = _quantize_half(mag_high, scales_f32, element_scale, s_dec)
    if FOUR_OVER_SIX:
        scales4, scales4_f32, element_scale4 = _block_scales(block_amax, 4.0, s_enc, s_dec)
        scaled4_low, rounded4_low, values4_low = _quantize_half(mag_low, scales4_f32, element_scale4, s_dec)
        scaled4_high, rounded4_high, values4_high = _quantize_half(mag_high, scales4_f32, element_scale4, s_dec)
        error6_low, error6_high = values_low - mag_low, values_high - mag_high
        error4_low, error4_high = values4_low - mag_low, values4_high - mag_high
        take_four = ((_pairwise_sum_8(error4_low * error4_low, BLOCKS) + _pairwise_sum_8(error4_high * error4_high, BLOCKS))
                     < (_pairwise_sum_8(error6_low * error6_low, BLOCKS) + _pairwise_sum_8(error6_high * error6_high, BLOCKS)))
        four = take_four[:, None]
        scales = tl.where(take_four, scales4, scales)
        scaled_low, scaled_high = tl.where(four, scaled4_low, scaled_low), tl.where(four, scaled4_high, scaled_high)
        rounded_low = tl.where(four, rounded4_low, rounded_low)
        rounded_high = tl.where(four, rounded4_high, rounded_high)
        values_low, values_high = tl.where(four, values4_low, values_low), tl.where(four, values4_high, values_high)
    # The sign bit follows x * e < 0; x * e can underflow to -0, which counts as not negative.
    negative_low = (low < 0) & (scaled_low > 0)
    negative_high = (high < 0) & (scaled_high > 0)
    return scales, rounded_low, rounded_high, values_low, values_high, negative_low, negative_high


@triton.jit
def _signed(values, negative):
    """The dequantized values with their sign (``* -1.0``, not unary minus: Triton lowers -v to
    0 - v, which turns -0 into +0)."""
    return tl.where(negative, values * -1.0, values)


@triton.jit
def _packed_codes(rounded, negative, BLOCKS: tl.constexpr):
    """uint8 [BLOCKS, 4]: a half's 8 E2M1 codes (sign in bit 3), element 2i in the low nibble."""
    code = _magnitude_code(rounded) | (negative.to(tl.int32) << 3)
    low, high = tl.split(tl.reshape(code, [BLOCKS, 4, 2]))
    return (low | (high << 4)).to(tl.uint8)


@triton.jit
def _nvfp4_kernel(x_ptr, amax_ptr, out_ptr, data_ptr, scale_ptr, n_blocks,
                  SCALE_MAX: tl.constexpr, FOUR_OVER_SIX: tl.constexpr, WRITE_VALUES: tl.constexpr,
                  BLOCKS: tl.constexpr):
    """Quantize BLOCKS blocks of 16 per program; write fake-quant values or packed codes + scales."""
    rows = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    mask = rows < n_blocks
    low, high = _load_halves(x_ptr, rows, mask)
    scales, rounded_low, rounded_high, values_low, values_high, negative_low, negative_high = _quantize_tile(
        low, high, tl.load(amax_ptr), SCALE_MAX, FOUR_OVER_SIX, BLOCKS)

    if WRITE_VALUES:
        _store_halves(out_ptr, rows, mask, _signed(values_low, negative_low), _signed(values_high, negative_high))
    else:
        byte_offsets = rows[:, None] * 8 + tl.arange(0, 4)[None, :]
        tl.store(data_ptr + byte_offsets, _packed_codes(rounded_low, negative_low, BLOCKS), mask=mask[:, None])
        tl.store(data_ptr + byte_offsets + 4, _packed_codes(rounded_high, negative_high, BLOCKS), mask=mask[:, None])
        tl.store(scale_ptr + rows, scales, mask=mask)


def _launch(x, amax, four_over_six, out=None, data=None, scales=None, *,
            blocks: int = _BLOCKS_PER_PROGRAM, num_warps: int = _NUM_WARPS):
    n_blocks = x.numel() // BLOCK_SIZE
    if n_blocks == 0:  # e.g. the tokens of an expert that was routed none
        return
    _nvfp4_kernel[(triton.cdiv(n_blocks, blocks),)](
        x, amax, out, data, scales, n_blocks,
        SCALE_MAX=FOUR_OVER_SIX_E4M3_MAX if four_over_six else E4M3_MAX,
        FOUR_OVER_SIX=four_over_six, WRITE_VALUES=out is not None,
        BLOCKS=blocks, num_warps=num_warps, enable_fp_fusion=False)


def fake_quantize(x: torch.Tensor, amax: torch.Tensor, four_over_six: bool, **launch) -> torch.Tensor:
    """Dequantized NVFP4 values of contiguous x (CUDA, fp32/bf16/fp16 [..., K]), same shape and dtype.

    amax: fp32 CUDA tensor with one element. ``launch``: ``blocks`` / ``num_warps`` overrides.
    """
    out = torch.empty_like(x)
    _launch(x, amax, four_over_six, out=out, **launch)
    return out


def quantize(x: torch.Tensor, amax: torch.Tensor, four_over_six: bool, **launch):
    """Packed codes uint8 [N/2] and scales float8_e4m3fn [N/16] of contiguous x (CUDA, N elements)."""
    data = torch.empty(x.numel() // 2, dtype=torch.uint8, device=x.device)
    scales = torch.empty(x.numel() // BLOCK_SIZE, dtype=torch.float8_e4m3fn, device=x.device)
    _launch(x, amax, four_over_six, data=data, scales=scales, **launch)
    return data, scales
