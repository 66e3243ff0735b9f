"""Input checks shared by the quantizers: clear errors that name the tensor and the fix."""

import torch

from .formats import BLOCK_SIZE, SUPPORTED_DTYPES

KERNEL_BACKENDS = ("auto", "torch", "triton")
"""Implementations of a quantizer: "torch" (any device), "triton" (CUDA), "auto" (Triton on CUDA)."""


def resolve_backend(x: torch.Tensor, backend: str) -> str:
    """"torch" or "triton" for ``backend`` (one of :data:`KERNEL_BACKENDS`) on x's device; ValueError
    for an unknown name or for "triton" off CUDA."""
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"backend must be one of {KERNEL_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda else "torch"
    if backend == "triton" and not x.is_cuda:
        raise ValueError(f"backend='triton' runs on CUDA tensors only, got a tensor on {x.device}; "
                         f"use backend='torch' or 'auto'")
    return backend


def check_floating(x: torch.Tensor, what: str) -> None:
    """Raise TypeError unless x is fp32, bf16 or fp16."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} expects a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{what} expects a float32, bfloat16 or float16 tensor, got dtype {x.dtype} "
            f"(shape {tuple(x.shape)}); cast it first, e.g. x.float()")


def check_nvfp4_shape(x: torch.Tensor) -> None:
    """Raise ValueError unless the last dimension splits into blocks of 16."""
    if x.dim() == 0 or x.shape[-1] % BLOCK_SIZE != 0:
        k = x.shape[-1] if x.dim() else "none (0-d tensor)"
        raise ValueError(
            f"NVFP4 quantizes blocks of {BLOCK_SIZE} elements along the last dimension, but the tensor "
            f"of shape {tuple(x.shape)} has last dimension {k}, which is not a multiple of "
            f"{BLOCK_SIZE}. Pad that dimension to a multiple of {BLOCK_SIZE} or keep this tensor in BF16.")


def check_finite(x: torch.Tensor, what: str) -> None:
    """Raise ValueError naming the shape and the NaN / Inf counts if x has non-finite values.

    Costs one pass over x and, on a GPU, one device-to-host synchronisation.
    """
    if bool(torch.isfinite(x).all()):
        return
    n_nan = int(torch.isnan(x).sum())
    n_inf = int(torch.isinf(x).sum())
    raise ValueError(
        f"{what}: the tensor of shape {tuple(x.shape)} has {n_nan} NaN and {n_inf} Inf elements; "
        f"quantization scales need finite input. Find where they arise (e.g. a diverged step) "
        f"or pass check_finite=False to skip this check.")


def as_amax_tensor(amax, device: torch.device, what: str) -> torch.Tensor:
    """Turn a float or one-element tensor amax into an fp32 0-d tensor on ``device``.

    A Python float or a CPU tensor must be finite and >= 0 (ValueError otherwise); a GPU tensor is
    taken as it is, without a device synchronisation. A 0-d fp32 tensor already on ``device`` is
    returned unchanged (the hot path of calibrated quantizers).
    """
    if isinstance(amax, torch.Tensor):
        if amax.numel() != 1:
            raise ValueError(f"{what}: amax must be a scalar, got a tensor of shape {tuple(amax.shape)}")
        if amax.device.type == "cpu":
            _check_amax_value(float(amax), what)
        if amax.dim() == 0 and amax.dtype == torch.float32 and amax.device == device:
            return amax
        return amax.detach().reshape(()).to(device=device, dtype=torch.float32)
    if isinstance(amax, (int, float)):
        _check_amax_value(float(amax), what)
        return torch.tensor(float(amax), dtype=torch.float32, device=device)
    raise TypeError(f"{what}: amax must be a float or a 0-d tensor, got {type(amax).__name__}")


def _check_amax_value(value: float, what: str) -> None:
    if not (value >= 0 and value != float("inf")):
        raise ValueError(f"{what}: amax must be finite and >= 0, got {value}")
