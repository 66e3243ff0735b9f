"""NVFP4 quantization: the public entry points.

``quantize`` returns an :class:`NVFP4Tensor` (packed E2M1 codes, FP8 E4M3 block scales, FP32 tensor
amax), the layout inference engines load; ``fake_quantize`` returns the dequantized values in the
input's dtype with a straight-through gradient, for training. ``four_over_six=True`` lets every
block map its max to 4 instead of 6 when that is more accurate (tensor scale range 256 instead of
448). The exact arithmetic is in DESIGN.md section 3; ``backend`` picks the torch reference or the
fused Triton kernel (CUDA only), which agree bit for bit.
"""

from dataclasses import dataclass

import torch

from . import nvfp4_torch
from .amax import absolute_max
from .formats import BLOCK_SIZE, pack_e2m1, unpack_e2m1
from .straight_through import straight_through
from .validation import (KERNEL_BACKENDS as BACKENDS, as_amax_tensor, check_finite, check_floating,
                         check_nvfp4_shape, resolve_backend)

__all__ = ["BLOCK_SIZE", "NVFP4Tensor", "quantize", "fake_quantize", "BACKENDS"]



@dataclass(frozen=True)
class NVFP4Tensor:
    """An NVFP4-quantized tensor of logical shape [..., K].

    data: uint8 [..., K/2], two E2M1 codes per byte (element 2i in the low nibble, sign in bit 3).
    scale: float8_e4m3fn [..., K/16], one decode scale per block of 16.
    global_amax: fp32 0-d tensor, the tensor amax the encode scale came from.
    four_over_six: whether the tensor scale range is 256 (Four Over Six) rather than 448.
    dtype: the dtype of the tensor that was quantized (the default for :meth:`dequantize`).
    """

    data: torch.Tensor
    scale: torch.Tensor
    global_amax: torch.Tensor
    four_over_six: bool
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        """The logical (unpacked) shape [..., K]."""
        return torch.Size((*self.data.shape[:-1], self.data.shape[-1] * 2))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Values ``(code * scale) / S_enc`` computed in fp32, returned in ``dtype`` (default: input dtype)."""
        codes = unpack_e2m1(self.data).reshape(-1, BLOCK_SIZE)
        values = nvfp4_torch.dequantize_blocks(codes, self.scale.reshape(-1), self.global_amax,
                                               self.four_over_six)
        return values.reshape(self.shape).to(dtype or self.dtype)


_triton_module = None


def _triton_backend():
    """The Triton kernels, imported on first GPU use so CPU-only installs never compile them."""
    global _triton_module
    if _triton_module is None:
        from . import nvfp4_triton
        _triton_module = nvfp4_triton
    return _triton_module


def _prepare(x: torch.Tensor, global_amax, backend: str, check_input: bool, what: str):
    """Validate x; return (contiguous x, fp32 0-d amax on x's device, backend name)."""
    check_floating(x, what)
    check_nvfp4_shape(x)
    backend = resolve_backend(x, backend)
    if not x.is_contiguous():
        x = x.contiguous()
    if global_amax is not None:
        amax = as_amax_tensor(global_amax, x.device, f"{what} global_amax")
        if check_input:
            check_finite(x, what)
    else:
        amax = absolute_max(x)
        if check_input and not bool(torch.isfinite(amax)):
            check_finite(x, what)
    return x, amax, backend


def quantize(x: torch.Tensor, global_amax=None, four_over_six: bool = False, *,
             backend: str = "auto", check_finite: bool = True) -> NVFP4Tensor:
    """Quantize x (fp32/bf16/fp16 [..., K], K a multiple of 16) to NVFP4.

    global_amax: float or 0-d tensor, the tensor amax to scale with (e.g. calibrated, or reduced
    over tensor-parallel ranks); None computes max |x|. check_finite: raise ValueError on NaN/Inf
    input, at the cost of one device synchronisation on GPUs; with it off, non-finite input gives
    unspecified values. backend: "auto" (Triton for CUDA tensors), "torch" or "triton".
    """
    x, amax, backend = _prepare(x, global_amax, backend, check_finite, "nvfp4.quantize")
    if backend == "triton":
        data, scales = _triton_backend().quantize(x, amax, four_over_six)
    else:
        result = nvfp4_torch.quantize_blocks(x.float().view(-1, BLOCK_SIZE), amax, four_over_six)
        data, scales = pack_e2m1(result.codes.view(-1)), result.scales
    leading = tuple(x.shape[:-1])
    return NVFP4Tensor(
        data=data.view(*leading, x.shape[-1] // 2),
        scale=scales.view(*leading, x.shape[-1] // BLOCK_SIZE),
        global_amax=amax, four_over_six=four_over_six, dtype=x.dtype)


def fake_quantize(x: torch.Tensor, global_amax=None, four_over_six: bool = False, *,
                  backend: str = "auto", check_finite: bool = True) -> torch.Tensor:
    """``quantize(x, ...).dequantize(x.dtype)`` in one pass, differentiable (straight-through).

    Returns a tensor of x's shape and dtype. Arguments as in :func:`quantize`.
    """
    def quantize_dequantize(inp: torch.Tensor) -> torch.Tensor:
        inp, amax, chosen = _prepare(inp, global_amax, backend, check_finite, "nvfp4.fake_quantize")
        if chosen == "triton":
            return _triton_backend().fake_quantize(inp, amax, four_over_six)
        values = nvfp4_torch.quantize_blocks(inp.float().view(-1, BLOCK_SIZE), amax, four_over_six).values
        return values.view(inp.shape).to(inp.dtype)

    return straight_through(x, quantize_dequantize)
