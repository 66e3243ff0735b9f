"""Straight-through estimators: quantize in the forward pass, pass the gradient unchanged (one
tensor, or many quantized together)."""

from collections.abc import Callable, Sequence

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


class _StraightThroughMany(torch.autograd.Function):
    @staticmethod
    def forward(ctx, quantize_dequantize, stacked, *tensors):
        ctx.set_materialize_grads(False)
        ctx.stacked, ctx.count = stacked, len(tensors)
        result = quantize_dequantize(tensors)
        return result if stacked else tuple(result)

    @staticmethod
    def backward(ctx, *grads):
        if not ctx.stacked:
            return (None, None, *grads)
        (grad,) = grads
        return (None, None, *((None,) * ctx.count if grad is None else grad.unbind(0)))


def straight_through_many(tensors: Sequence[torch.Tensor],
                          quantize_dequantize: Callable[[tuple[torch.Tensor, ...]], Sequence[torch.Tensor] | torch.Tensor],
                          stacked: bool) -> tuple[torch.Tensor, ...] | torch.Tensor:
    """``quantize_dequantize(tensors)`` with each tensor's gradient the identity on its result.

    ``quantize_dequantize`` returns one tensor per input, of its shape (``stacked=False``; the result
    is a tuple), or them stacked into one tensor [n, *shape] (``stacked=True``; each input's
    gradient is its slice of the stacked gradient).
    """
    tensors = tuple(tensors)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _StraightThroughMany.apply(quantize_dequantize, stacked, *tensors)
    result = quantize_dequantize(tensors)
    return result if stacked else tuple(result)
