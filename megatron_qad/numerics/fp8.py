"""Per-tensor FP8 E4M3 fake quantization (the KV-cache format), straight-through gradient.

scale ``s = min(448 / amax, FLT_MAX)`` (1 if amax is 0); ``q = e4m3_rne(clamp(x * s, -448, 448))``;
value ``q / s`` in x's dtype. An inference engine stores ``1 / s = amax / 448`` as the K or V scale.
``backend`` picks the torch formula or the fused Triton kernel (CUDA only), which agree bit for bit.
"""

import torch

from .formats import E4M3_MAX, encode_scale
from .straight_through import straight_through
from .validation import KERNEL_BACKENDS as BACKENDS, as_amax_tensor, check_floating, resolve_backend

__all__ = ["BACKENDS", "fake_quantize_e4m3"]


def _quantize_dequantize(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    scale = encode_scale(amax, E4M3_MAX)
    codes = (x.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return torch.div(codes.float(), scale).to(x.dtype)


def fake_quantize_e4m3(x: torch.Tensor, amax, *, backend: str = "auto") -> torch.Tensor:
    """Round x (fp32/bf16/fp16, any shape) through FP8 E4M3 with per-tensor amax (float or 0-d tensor).

    Values beyond amax saturate at +-amax (up to rounding). Returns x's shape and dtype.
    backend: "auto" (Triton for CUDA tensors), "torch" or "triton".
    """
    check_floating(x, "fp8.fake_quantize_e4m3")
    amax = as_amax_tensor(amax, x.device, "FP8 amax")
    if resolve_backend(x, backend) == "triton":
        from . import fp8_triton
        return straight_through(x, lambda inp: fp8_triton.fake_quantize_e4m3(inp, amax))
    return straight_through(x, lambda inp: _quantize_dequantize(inp, amax))
