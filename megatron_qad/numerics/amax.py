"""The tensor amax (max |x|, fp32) every NVFP4 and FP8 quantizer scales with: one choice of kernel.

Large CUDA tensors take the Triton two-launch reduction (``amax_triton``), 21 % less GPU time than
torch's one-launch ``vector_norm(ord=inf)`` on an 8192 x 8192 bf16 tensor (H200, 2026-11-30). The
second launch costs about 20 us of host time, which only a step the GPU is busy with hides, so
tensors below ``TRITON_MIN_ELEMENTS`` (where the GPU saving is under 2 us) keep torch's reduction.
Both are exact, so the choice never changes a bit of the result.
"""

import torch

from . import nvfp4_torch

TRITON_MIN_ELEMENTS = 1 << 24  # 32 MiB of bf16: torch's reduction takes about 10 us on an H200


def absolute_max(x: torch.Tensor) -> torch.Tensor:
    """max |x| as a 0-d fp32 tensor on x's device; NaN if x holds a NaN; 0 for an empty x."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    if x.is_cuda and x.numel() >= TRITON_MIN_ELEMENTS and x.is_contiguous():
        from . import amax_triton  # here, so that CPU-only installs never compile the kernels

        return amax_triton.absolute_max(x)
    return nvfp4_torch.absolute_max(x)
