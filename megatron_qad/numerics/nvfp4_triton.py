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

_BLOCKS_PER_PROGRAM = 64  # NVFP4 blocks (x16 elements) per program; from benchmarks/sweep_nvfp4_kernels.py
_NUM_WARPS = 4
_FLT_MAX = tl.constexpr(FLT_MAX)
_E4M3_MAX = tl.constexpr(E4M3_MAX)


@triton.jit
def _pairwise_sum_16(t, BLOCKS: tl.constexpr):
    """fp32 [BLOCKS, 16] -> [BLOCKS], summing adjacent pairs level by level."""
    a, b = tl.split(tl.reshape(t, [BLOCKS, 8, 2]))
    a, b = tl.split(tl.reshape(a + b, [BLOCKS, 4, 2]))
    a, b = tl.split(tl.reshape(a + b, [BLOCKS, 2, 2]))
    a, b = tl.split(a + b)
    return a + b


@triton.jit
def _quantize_magnitudes(magnitude, block_amax, mapped_max, s_enc, s_dec):
    """Quantize |x| (fp32 [B, 16]) with each block's amax mapped to ``mapped_max`` (6 or 4).

    Returns the FP8 scales [B], the scaled magnitudes ``min(|x| * e, 6)`` [B, 16] (0 where x * e
    underflows, which decides the sign bit), the 3-bit magnitude codes (int32 [B, 16]) and the
    dequantized magnitudes ``(q * d) * S_dec`` (fp32 [B, 16]). Rounding is sign-symmetric, so
    working on |x| and applying the sign afterwards gives the same bits as the signed formula.
    """
    block_decode = tl.minimum(tl.math.div_rn(block_amax, mapped_max) * s_enc, _E4M3_MAX)
    scales = block_decode.to(tl.float8e4nv, fp_downcast_rounding="rtne")
    scales_f32 = scales.to(tl.float32)
    element_scale = tl.minimum(tl.math.div_rn(1.0, scales_f32 * s_dec), _FLT_MAX)
    scaled = tl.minimum(magnitude * element_scale[:, None], 6.0)
    # E2M1 round to nearest even: the grid step is 0.5 below 2, 1 below 4 and 2 up to 6. Adding
    # 2^22, 2^23 or 2^24 (whose fp32 ulp is that step) rounds to the grid with ties to the even
    # multiple, which is the even E2M1 code; subtracting it again is exact.
    magic = tl.where(scaled < 2.0, 4194304.0, tl.where(scaled < 4.0, 8388608.0, 16777216.0))
    rounded = (scaled + magic) - magic
    # 3-bit magnitude index: 2q for q < 2, q + 2 for q in {2, 3}, q / 2 + 4 for q in {4, 6}.
    code = tl.where(rounded < 2.0, rounded * 2.0,
                    tl.where(rounded < 4.0, rounded + 2.0, rounded * 0.5 + 4.0)).to(tl.int32)
    values = rounded * scales_f32[:, None] * s_dec
    return scales, scaled, code, values


@triton.jit
def _quantize_tile(x, amax, SCALE_MAX: tl.constexpr, FOUR_OVER_SIX: tl.constexpr, BLOCKS: tl.constexpr):
    """Quantize the fp32 blocks x [BLOCKS, 16] with the tensor amax (fp32 scalar).

    Returns the FP8 scales [BLOCKS], the 3-bit magnitude codes (int32 [BLOCKS, 16]), the
    dequantized magnitudes (fp32 [BLOCKS, 16]) and which elements carry the sign bit (bool).
    """
    s_enc = tl.minimum(tl.math.div_rn(6.0 * SCALE_MAX, amax), _FLT_MAX)
    s_enc = tl.where((amax == 0.0) | (s_enc == 0.0), 1.0, s_enc)
    s_dec = tl.math.div_rn(1.0, s_enc)

    magnitude = tl.abs(x)
    block_amax = tl.max(magnitude, axis=1)
    scales, scaled, code, values = _quantize_magnitudes(magnitude, block_amax, 6.0, s_enc, s_dec)
    if FOUR_OVER_SIX:
        scales4, scaled4, code4, values4 = _quantize_magnitudes(magnitude, block_amax, 4.0, s_enc, s_dec)
        error6 = values - magnitude
        error4 = values4 - magnitude
        take_four = _pairwise_sum_16(error4 * error4, BLOCKS) < _pairwise_sum_16(error6 * error6, BLOCKS)
        scales = tl.where(take_four, scales4, scales)
        scaled = tl.where(take_four[:, None], scaled4, scaled)
        code = tl.where(take_four[:, None], code4, code)
        values = tl.where(take_four[:, None], values4, values)
    # The sign bit follows x * e < 0; x * e can underflow to -0, which counts as not negative.
    negative = (x < 0) & (scaled > 0)
    return scales, code, values, negative


@triton.jit
def _signed(values, negative):
    """The dequantized values with their sign (``* -1.0``, not unary minus: Triton lowers -v to
    0 - v, which turns -0 into +0)."""
    return tl.where(negative, values * -1.0, values)


@triton.jit
def _nvfp4_kernel(x_ptr, amax_ptr, out_ptr, data_ptr, scale_ptr, n_blocks,
                  SCALE_MAX: tl.constexpr, FOUR_OVER_SIX: tl.constexpr, WRITE_VALUES: tl.constexpr,
                  BLOCKS: tl.constexpr):
    """Quantize BLOCKS blocks of 16 per program; write fake-quant values or packed codes + scales."""
    rows = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    row_mask = rows < n_blocks
    offsets = rows[:, None] * 16 + tl.arange(0, 16)[None, :]
    x = tl.load(x_ptr + offsets, mask=row_mask[:, None], other=0.0).to(tl.float32)
    scales, code, values, negative = _quantize_tile(x, tl.load(amax_ptr), SCALE_MAX, FOUR_OVER_SIX, BLOCKS)

    if WRITE_VALUES:
        tl.store(out_ptr + offsets, _signed(values, negative).to(out_ptr.dtype.element_ty), mask=row_mask[:, None])
    else:
        code = code | (negative.to(tl.int32) << 3)
        low, high = tl.split(tl.reshape(code, [BLOCKS, 8, 2]))
        packed = (low | (high << 4)).to(tl.uint8)
        byte_offsets = rows[:, None] * 8 + tl.arange(0, 8)[None, :]
        tl.store(data_ptr + byte_offsets, packed, mask=row_mask[:, None])
        tl.store(scale_ptr + rows, scales, mask=row_mask)


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
