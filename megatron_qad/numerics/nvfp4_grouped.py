"""NVFP4 fake quant of many tensors at once, each with its own tensor amax: the local experts of a
MoE layer, whose weights and token groups each get their own NVFP4 tensor scale.

  * :func:`fake_quantize_rows`: x [T, ..., K] whose rows split into consecutive groups (``m_splits``:
    each expert's tokens, one expert after another), group i scaled with ``amax[i]``;
  * :func:`fake_quantize_tensors`: separate tensors (each expert's weight), returned as a tuple, or
    stacked into one [n, *shape] tensor for a grouped GEMM;
  * :func:`segments_amax`: max |t| of each tensor (0 for an empty one) as fp32 [n].

Every tensor's result equals ``nvfp4.fake_quantize(tensor, amax[i], four_over_six)`` bit for bit.
``backend`` "triton" (CUDA) quantizes all of them in one kernel launch (``nvfp4_grouped_triton``)
and computes all amaxes in one more; "torch" loops over them with the reference
(``nvfp4_torch``); "auto" picks Triton for CUDA tensors. Gradients are straight-through. Non-finite
input gives unspecified values (there is no finite check here: the training path does not make
one either).
"""

from collections.abc import Sequence

import torch

from . import nvfp4_torch
from .amax import absolute_max
from .formats import BLOCK_SIZE
from .straight_through import straight_through, straight_through_many
from .validation import check_floating, check_nvfp4_shape, resolve_backend

__all__ = ["fake_quantize_rows", "fake_quantize_tensors", "segments_amax"]

_triton_module = None


def _triton_backend():
    """The multi-tensor Triton kernels, imported on first GPU use."""
    global _triton_module
    if _triton_module is None:
        from . import nvfp4_grouped_triton
        _triton_module = nvfp4_grouped_triton
    return _triton_module


def _check_segments(segments: Sequence[torch.Tensor], what: str) -> None:
    """Raise for an empty list, or tensors of another dtype / device than the first, or not NVFP4-shaped."""
    if not segments:
        raise ValueError(f"{what}: no tensors to quantize")
    first = segments[0]
    for segment in segments:
        check_floating(segment, what)
        check_nvfp4_shape(segment)
        if segment.dtype != first.dtype or segment.device != first.device:
            raise ValueError(f"{what}: every tensor must have the first one's dtype and device "
                             f"({first.dtype}, {first.device}), got {segment.dtype} on {segment.device}")


def _check_amax(amax: torch.Tensor, count: int, device: torch.device, what: str) -> None:
    if not (isinstance(amax, torch.Tensor) and amax.dtype == torch.float32 and amax.shape == (count,)
            and amax.device == device):
        described = (f"{amax.dtype} {tuple(amax.shape)} on {amax.device}" if isinstance(amax, torch.Tensor)
                     else type(amax).__name__)
        raise ValueError(f"{what}: amax must be an fp32 tensor of shape ({count},) on {device}, one per "
                         f"tensor, got {described}")


def segments_amax(segments: Sequence[torch.Tensor], *, backend: str = "auto") -> torch.Tensor:
    """max |segment| of each of ``segments`` (fp32 / bf16 / fp16, same dtype and device, last dim a
    multiple of 16) as an fp32 tensor [n] on their device; 0 for an empty segment. Exact: each max
    is one of the segment's values. NaN input gives unspecified values."""
    _check_segments(segments, "nvfp4_grouped.segments_amax")
    if resolve_backend(segments[0], backend) == "triton":
        return _triton_backend().segments_amax([s.contiguous() for s in segments])
    return torch.stack([absolute_max(s) for s in segments])


ALIGNMENT_BYTES = 256
"""Where :func:`fake_quantize_tensors` starts each tensor's result in its buffer: at a multiple of
this many bytes, as the caching allocator aligns a tensor of its own, so a GEMM library picks the
same kernels for a result as for a separately allocated tensor (cuBLAS's choice depends on it)."""


def _starts(segments: Sequence[torch.Tensor], align: bool) -> tuple[list[int], int]:
    """Element offsets of the segments' results one after another (each start rounded up to
    :data:`ALIGNMENT_BYTES` when ``align``), and the elements they span."""
    step = max(BLOCK_SIZE, ALIGNMENT_BYTES // segments[0].element_size()) if align else BLOCK_SIZE
    starts, position = [], 0
    for segment in segments:
        starts.append(position)
        position += -(-segment.numel() // step) * step if align else segment.numel()
    return starts, position


def _fake_quantize_into(segments: Sequence[torch.Tensor], amax: torch.Tensor, four_over_six: bool,
                        backend: str, out: torch.Tensor, starts: Sequence[int]) -> torch.Tensor:
    """Write the fake quant of each contiguous segment into contiguous ``out`` from element ``starts[i]`` on."""
    if backend == "triton":
        return _triton_backend().fake_quantize_segments(segments, amax, four_over_six, out, starts)
    flat = out.view(-1)
    for index, (segment, start) in enumerate(zip(segments, starts)):
        if segment.numel():
            values = nvfp4_torch.quantize_blocks(segment.float().view(-1, BLOCK_SIZE), amax[index], four_over_six).values
            flat[start:start + segment.numel()] = values.view(-1).to(segment.dtype)
    return out


def _resolve(segments, amax, backend: str, what: str) -> tuple[torch.Tensor, str]:
    _check_segments(segments, what)
    backend = resolve_backend(segments[0], backend)
    if amax is None:
        amax = segments_amax(segments, backend=backend)
    _check_amax(amax, len(segments), segments[0].device, what)
    return amax, backend


def fake_quantize_rows(x: torch.Tensor, m_splits: Sequence[int], amax: torch.Tensor | None = None,
                       four_over_six: bool = False, *, backend: str = "auto") -> torch.Tensor:
    """x [T, ..., K] (fp32 / bf16 / fp16, K a multiple of 16) with its rows ``x[start_i : start_i +
    m_splits[i]]`` fake-quantized to NVFP4 with ``amax[i]`` (fp32 [len(m_splits)] on x's device;
    None: each group's own max |x|). ``m_splits``: host ints summing to T, zeros allowed. Returns a
    tensor of x's shape and dtype; the gradient is straight-through."""
    m_splits = [int(rows) for rows in m_splits]
    if sum(m_splits) != x.shape[0] or min(m_splits, default=0) < 0:
        raise ValueError(f"nvfp4_grouped.fake_quantize_rows: m_splits {m_splits} must be >= 0 and sum to "
                         f"the {x.shape[0]} rows of x")

    def quantize_dequantize(inp: torch.Tensor) -> torch.Tensor:
        inp = inp.contiguous()
        segments = torch.split(inp, m_splits)
        group_amax, chosen = _resolve(segments, amax, backend, "nvfp4_grouped.fake_quantize_rows")
        return _fake_quantize_into(segments, group_amax, four_over_six, chosen, torch.empty_like(inp),
                                   _starts(segments, align=False)[0])

    return straight_through(x, quantize_dequantize)


def fake_quantize_tensors(tensors: Sequence[torch.Tensor], amax: torch.Tensor | None = None,
                          four_over_six: bool = False, *, stacked: bool = False,
                          backend: str = "auto") -> tuple[torch.Tensor, ...] | torch.Tensor:
    """Each of ``tensors`` (same dtype and device, last dims multiples of 16) fake-quantized to NVFP4
    with ``amax[i]`` (fp32 [n] on their device; None: each tensor's own max |t|).

    Returns a tuple of tensors of the inputs' shapes (views of one buffer, each starting at a
    multiple of :data:`ALIGNMENT_BYTES`), or with ``stacked`` one tensor [n, *shape] (all inputs of
    one shape). Each input's gradient is the identity on its result.
    """
    tensors = tuple(tensors)
    if stacked and any(t.shape != tensors[0].shape for t in tensors):
        raise ValueError(f"nvfp4_grouped.fake_quantize_tensors: stacked=True needs tensors of one shape, "
                         f"got {sorted({tuple(t.shape) for t in tensors})}")

    def quantize_dequantize(inputs: tuple[torch.Tensor, ...]):
        segments = [t.detach().contiguous() for t in inputs]
        group_amax, chosen = _resolve(segments, amax, backend, "nvfp4_grouped.fake_quantize_tensors")
        first = segments[0]
        if stacked:
            return _fake_quantize_into(segments, group_amax, four_over_six, chosen,
                                       first.new_empty((len(segments), *first.shape)), _starts(segments, align=False)[0])
        starts, total = _starts(segments, align=True)
        out = _fake_quantize_into(segments, group_amax, four_over_six, chosen, first.new_empty(total), starts)
        return tuple(out[start:start + s.numel()].view(s.shape) for start, s in zip(starts, segments))

    return straight_through_many(tensors, quantize_dequantize, stacked)
