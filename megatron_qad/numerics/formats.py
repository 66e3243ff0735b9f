"""Constants and element-level rounding of the NVFP4 and FP8 formats, on plain torch tensors.

NVFP4 (see DESIGN.md section 3):
  element  FP4 E2M1, magnitudes (0, 0.5, 1, 1.5, 2, 3, 4, 6), round to nearest, ties to even code;
  block    16 consecutive elements along the last (GEMM reduction) dimension share one FP8 E4M3
           decode scale;
  tensor   one FP32 encode scale ``S_enc = 6 * E4M3_MAX / amax`` per tensor.

An E2M1 code is 4 bits: bit 3 is the sign, bits 0-2 index ``E2M1_MAGNITUDES``. The sign bit is set
iff the scaled value is < 0, so a small negative value that rounds to zero encodes as 8 (-0.0),
as in Transformer Engine's reference quantizer.
"""

import torch

BLOCK_SIZE = 16
"""Elements per NVFP4 block, along the last dimension."""

E2M1_MAX = 6.0
E4M3_MAX = 448.0
"""Largest finite FP8 E4M3 (fn) value."""

FOUR_OVER_SIX_E4M3_MAX = 256.0
"""Tensor-scale range used by Four Over Six: a block mapped to 4 needs 6/4 x the scale of one
mapped to 6, so the largest block scale (256 * 6/4 = 384) still fits E4M3."""

FLT_MAX = torch.finfo(torch.float32).max

E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

E2M1_ROUNDING_THRESHOLDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True),
                            (2.5, False), (3.5, True), (5.0, False))
"""(midpoint, inclusive) between consecutive E2M1 magnitudes. A magnitude moves past a midpoint
when it is greater than it, or equal to it where the upper neighbour has the even code (ties to
even): 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4."""

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def e2m1_magnitude_code(magnitude: torch.Tensor) -> torch.Tensor:
    """Round non-negative fp32 values in [0, 6] to E2M1, returning the 3-bit magnitude index (uint8)."""
    code = torch.zeros(magnitude.shape, dtype=torch.uint8, device=magnitude.device)
    for midpoint, inclusive in E2M1_ROUNDING_THRESHOLDS:
        code += (magnitude >= midpoint) if inclusive else (magnitude > midpoint)
    return code


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """Map 4-bit E2M1 codes (uint8, sign in bit 3) to their fp32 values; code 8 is -0.0."""
    magnitudes = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=codes.device)
    table = torch.cat([magnitudes, -magnitudes])
    return table[codes.long()]


def encode_scale(amax: torch.Tensor, target_max: float) -> torch.Tensor:
    """Per-tensor FP32 encode scale ``min(target_max / amax, FLT_MAX)``, or 1 where amax is 0.

    ``amax``: fp32 tensor (any shape). ``target_max``: the largest encoded magnitude, 6 * 448 for
    NVFP4, 6 * 256 for Four Over Six, 448 for FP8. Returns fp32 of amax's shape. ``S_enc == 0``
    (amax infinite) also falls back to 1, as Transformer Engine's quantization kernels do.
    """
    # A fill, not torch.tensor(target_max, device=...): that copies from the host and, on a GPU,
    # synchronises the device at every call.
    numerator = amax.new_full((), target_max, dtype=torch.float32)
    scale = torch.div(numerator, amax).clamp(max=FLT_MAX)
    return torch.where((amax == 0) | (scale == 0), torch.ones_like(scale), scale)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (uint8 [..., K], K even) two per byte: element 2i low nibble, 2i+1 high."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_e2m1(data: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_e2m1`: uint8 [..., K/2] -> codes uint8 [..., K]."""
    codes = torch.stack([data & 0xF, data >> 4], dim=-1)
    return codes.flatten(-2)


def pairwise_sum_16(values: torch.Tensor) -> torch.Tensor:
    """Sum fp32 [..., 16] -> [...] as a fixed tree over adjacent pairs ((0+1)+(2+3))+...

    The order is part of the Four Over Six spec: every backend sums the same way, so block choices
    agree bit for bit.
    """
    while values.shape[-1] > 1:
        values = values[..., 0::2] + values[..., 1::2]
    return values[..., 0]
