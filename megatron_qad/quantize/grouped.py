"""Fake quant of a MoE layer's experts in a few kernel launches instead of a few per expert: the
grouped-GEMM experts of the TE spec (``te_layers.QuantizedTEGroupedLinear``) and the local spec's
``SequentialMLP`` (:mod:`.grouped_mlp`).

Each local expert keeps its own :class:`TensorQuantizer` for its tokens and its weight (its amax,
its checkpoint key); here the quantizers of one role run together: their amaxes as one fp32 [E]
tensor (one kernel, or the stacked calibrated buffers; one MAX all-reduce over the TP group instead
of one per expert), then every expert's tensor quantized by one launch of the multi-tensor kernel
(``numerics.nvfp4_grouped``). Each expert's values equal its own quantizer's bit for bit. Holding
(``reuse_quantized_weights``) keeps the group's quantized weights in the first expert's quantizer.
"""

from collections.abc import Callable, Sequence

import torch

from ..numerics import nvfp4_grouped
from ..numerics.straight_through import straight_through_many
from .quantizer import TensorQuantizer, tensor_key

GROUPED_FORMATS = ("nvfp4", "nvfp4_4over6")


def can_group(quantizers: Sequence[TensorQuantizer]) -> bool:
    """Whether ``quantizers`` can run as one group now: one NVFP4 format, one amax mode and TP group,
    none calibrating (calibration observes each expert on its own)."""
    first = quantizers[0]
    return first.fmt in GROUPED_FORMATS and all(
        q.fmt == first.fmt and q.amax_mode == first.amax_mode and q.tp_group is first.tp_group and not q.calibrating
        for q in quantizers)


def group_amax(quantizers: Sequence[TensorQuantizer], segments: Callable[[], Sequence[torch.Tensor]]) -> torch.Tensor:
    """The amax each quantizer scales its segment with, as fp32 [E]: the calibrated ones stacked, or
    each segment's max |x| (``segments()``: one tensor per quantizer, asked for only here) MAX-reduced
    over the TP group in one collective."""
    first = quantizers[0]
    if first.amax_mode == "static":
        return torch.stack([q.static_amax() for q in quantizers])
    with torch.no_grad():
        local = nvfp4_grouped.segments_amax([segment.detach() for segment in segments()])
    return TensorQuantizer._reduce_max(local, (first.tp_group,))


def fake_quantize_tokens(quantizers: Sequence[TensorQuantizer], x: torch.Tensor, m_splits: Sequence[int]) -> torch.Tensor:
    """x [tokens, K], the experts' tokens one expert after another (``m_splits`` host ints), each
    expert's rows fake-quantized by its quantizer's numerics; straight-through gradient."""
    amax = group_amax(quantizers, lambda: torch.split(x, list(m_splits)))
    return nvfp4_grouped.fake_quantize_rows(x, m_splits, amax, quantizers[0].fmt == "nvfp4_4over6")


def fake_quantize_weights(quantizers: Sequence[TensorQuantizer], weights: Sequence[torch.Tensor],
                          stacked: bool = False) -> tuple[torch.Tensor, ...] | torch.Tensor:
    """Each expert's weight fake-quantized by its quantizer's numerics: a tuple of [N, K] tensors, or
    with ``stacked`` one [E, N, K] tensor; each weight's gradient is straight-through. While the
    quantizers hold, the group is quantized once and reused until a weight changes its storage."""
    first = quantizers[0]
    four_over_six = first.fmt == "nvfp4_4over6"

    def quantize(tensors: Sequence[torch.Tensor]):
        return nvfp4_grouped.fake_quantize_tensors(tensors, group_amax(quantizers, lambda: tensors), four_over_six,
                                                   stacked=stacked)

    if not first.holding:
        return quantize(weights)
    key = ("experts", stacked, tuple(tensor_key(w) for w in weights))
    held = first.hold(key, lambda: quantize([w.detach() for w in weights]))
    # Fresh aliases without autograd history, as a single quantizer's held tensor is given out.
    return straight_through_many(weights, lambda _: held.detach() if stacked else tuple(h.detach() for h in held),
                                 stacked)
