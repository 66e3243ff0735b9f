"""Fused FP8 E4M3 fake-quantization kernel for CUDA GPUs (Triton): one pass, one launch.

The torch formula of :mod:`.fp8` launches about a dozen kernels per call (the scale, the cast to
fp32, the multiply, the clamp, the two FP8 casts, the division, the cast back); K and V go through
it in every attention layer of every micro-batch, so on GPUs the launches, not the bytes, cost.
This kernel computes the encode scale from the amax in each program and writes the dequantized
values directly. Bits equal the torch formula: the division is IEEE round-to-nearest (``div_rn``),
the FP8 cast rounds to nearest even, and NaN propagates through the clamp as in ``torch.clamp``.
"""

import torch
import triton
import triton.language as tl

from .formats import E4M3_MAX, FLT_MAX

_BLOCK = 4096  # elements per program
_NUM_WARPS = 8
_E4M3_MAX = tl.constexpr(E4M3_MAX)
_FLT_MAX = tl.constexpr(FLT_MAX)


@triton.jit
def _fp8_e4m3_kernel(x_ptr, amax_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < n
    x = tl.load(x_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
    amax = tl.load(amax_ptr)
    scale = tl.minimum(tl.math.div_rn(_E4M3_MAX, amax), _FLT_MAX)
    scale = tl.where((amax == 0.0) | (scale == 0.0), 1.0, scale)
    scaled = tl.clamp(x * scale, -_E4M3_MAX, _E4M3_MAX, propagate_nan=tl.PropagateNan.ALL)
    codes = scaled.to(tl.float8e4nv, fp_downcast_rounding="rtne")
    values = tl.math.div_rn(codes.to(tl.float32), scale)
    tl.store(out_ptr + offsets, values.to(out_ptr.dtype.element_ty), mask=in_range)


def fake_quantize_e4m3(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 round trip of CUDA ``x`` (fp32/bf16/fp16, any shape) with the fp32 0-d ``amax``.

    Returns a new contiguous tensor of x's shape and dtype.
    """
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        _fp8_e4m3_kernel[(triton.cdiv(n, _BLOCK),)](x, amax, out, n, BLOCK=_BLOCK, num_warps=_NUM_WARPS,
                                                     enable_fp_fusion=False)
    return out
