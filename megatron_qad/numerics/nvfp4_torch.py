"""NVFP4 / Four Over Six quantization with plain torch ops: the reference backend (CPU and GPU).

Every function works on a contiguous view of blocks, ``x_blocks`` fp32 [B, 16], and a 0-d fp32
tensor amax; all arithmetic is fp32, in the order that DESIGN.md section 3 and the Triton kernel use.
"""

from typing import NamedTuple

import torch

from .formats import (E2M1_MAX, E4M3_MAX, FOUR_OVER_SIX_E4M3_MAX, FLT_MAX, e2m1_decode,
                      e2m1_magnitude_code, encode_scale, pairwise_sum_16)


class BlockQuantization(NamedTuple):
    """Result of quantizing B blocks of 16.

    codes: uint8 [B, 16] E2M1 codes (sign in bit 3); scales: float8_e4m3fn [B] decode scales;
    values: fp32 [B, 16] dequantized values ``(code * scale) * S_dec``.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    values: torch.Tensor


def _quantize_with_mapped_max(x_blocks, block_amax, mapped_max, s_enc, s_dec) -> BlockQuantization:
    """Quantize every block so that its amax maps to ``mapped_max`` (6, or 4 for Four Over Six)."""
    # A true division: on CUDA, ``tensor / python_float`` multiplies by the rounded reciprocal.
    block_decode = torch.div(block_amax, block_amax.new_full((), mapped_max)) * s_enc
    # min(min(a, FLT_MAX), 448) == min(a, 448): one clamp covers both bounds of the spec.
    scales = block_decode.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    scales_f32 = scales.to(torch.float32)
    element_scale = (1.0 / (scales_f32 * s_dec)).clamp(max=FLT_MAX)
    scaled = (x_blocks * element_scale[:, None]).clamp(-E2M1_MAX, E2M1_MAX)
    codes = e2m1_magnitude_code(scaled.abs()) | ((scaled < 0).to(torch.uint8) << 3)
    values = e2m1_decode(codes) * scales_f32[:, None] * s_dec
    return BlockQuantization(codes, scales, values)


def quantize_blocks(x_blocks: torch.Tensor, amax: torch.Tensor, four_over_six: bool) -> BlockQuantization:
    """Quantize fp32 [B, 16] blocks with tensor amax (0-d fp32) to NVFP4, or Four Over Six."""
    scale_max = FOUR_OVER_SIX_E4M3_MAX if four_over_six else E4M3_MAX
    s_enc = encode_scale(amax, E2M1_MAX * scale_max)
    s_dec = 1.0 / s_enc
    block_amax = x_blocks.abs().amax(dim=-1)
    six = _quantize_with_mapped_max(x_blocks, block_amax, 6.0, s_enc, s_dec)
    if not four_over_six:
        return six
    four = _quantize_with_mapped_max(x_blocks, block_amax, 4.0, s_enc, s_dec)
    take_four = pairwise_sum_16((four.values - x_blocks) ** 2) < pairwise_sum_16((six.values - x_blocks) ** 2)
    return BlockQuantization(
        codes=torch.where(take_four[:, None], four.codes, six.codes),
        scales=torch.where(take_four, four.scales.view(torch.uint8), six.scales.view(torch.uint8))
        .view(torch.float8_e4m3fn),
        values=torch.where(take_four[:, None], four.values, six.values),
    )


def absolute_max(x: torch.Tensor) -> torch.Tensor:
    """max |x| as a 0-d fp32 tensor, one pass and no temporary (NaN if x has NaN).

    Exact: the max of |x| is one of x's values, representable in fp32 whatever x's dtype.
    """
    return torch.linalg.vector_norm(x, ord=float("inf"), dtype=torch.float32)


def dequantize_blocks(codes: torch.Tensor, scales: torch.Tensor, amax: torch.Tensor,
                      four_over_six: bool) -> torch.Tensor:
    """fp32 [B, 16] values of E2M1 codes uint8 [B, 16] with decode scales float8_e4m3fn [B]."""
    s_enc = encode_scale(amax, E2M1_MAX * (FOUR_OVER_SIX_E4M3_MAX if four_over_six else E4M3_MAX))
    return e2m1_decode(codes) * scales.to(torch.float32)[:, None] * (1.0 / s_enc)
