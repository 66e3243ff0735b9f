"""NVFP4, Four Over Six and FP8 numerics on plain torch tensors (no Megatron imports).

``nvfp4.quantize`` / ``nvfp4.fake_quantize`` and ``fp8.fake_quantize_e4m3`` are the entry points.
"""

from . import fp8, nvfp4

__all__ = ["fp8", "nvfp4"]
