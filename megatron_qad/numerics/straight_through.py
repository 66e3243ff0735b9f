"""Straight-through estimator: quantize in the forward pass, pass the gradient unchanged."""

from collections.abc import Callable

import torch


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, quantize_dequantize):
        return quantize_dequantize(x)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


def straight_through(x: torch.Tensor, quantize_dequantize: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``quantize_dequantize(x)`` whose gradient with respect to x is the identity.

    ``quantize_dequantize`` must return a tensor of x's shape. Without autograd (x needs no grad, or
    grad mode is off) it is simply called.
    """
    if x.requires_grad and torch.is_grad_enabled():
        return _StraightThrough.apply(x, quantize_dequantize)
    return quantize_dequantize(x)
