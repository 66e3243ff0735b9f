"""Multi-tensor NVFP4 kernels (Triton): many tensors, each with its own amax, in one launch.

The tensors (segments) are described by a table of four int64 rows, one column per segment:
the index of its first program, where its blocks start relative to the base tensor, where its
fake-quant values go in the output, and its number of 16-element blocks. A program of the 1-D grid
finds its segment by a binary search of the first row, then quantizes up to ``BLOCKS`` blocks of
it exactly as the single-tensor kernel of ``nvfp4_triton`` does (the same ``_quantize_tile``), so
every segment's bits equal that kernel's on the segment alone. A segment of no blocks (an expert
routed no tokens) gets no program.

Segments are addressed as block offsets from the base tensor, so the weights of many experts need
not be one buffer; a segment whose start is not a whole number of blocks away from the base is
copied first (see :func:`segment_table`).
"""

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .formats import BLOCK_SIZE, E4M3_MAX, FOUR_OVER_SIX_E4M3_MAX
from .nvfp4_triton import _BLOCKS_PER_PROGRAM, _NUM_WARPS, _load_halves, _quantize_tile, _signed, _store_halves

_INT64_MAX = tl.constexpr(2**63 - 1)


@triton.jit
def _find_segment(table_ptr, n_segments, program, SEARCH_STEPS: tl.constexpr):
    """The last segment whose first program is <= ``program`` (the table's first row is sorted)."""
    segment = program * 0
    for step in tl.static_range(SEARCH_STEPS):
        candidate = segment + (1 << (SEARCH_STEPS - 1 - step))
        first = tl.load(table_ptr + candidate, mask=candidate < n_segments, other=_INT64_MAX)
        segment = tl.where(first <= program, candidate, segment)
    return segment


@triton.jit
def _segment_tile(base_ptr, table_ptr, n_segments, SEARCH_STEPS: tl.constexpr, BLOCKS: tl.constexpr):
    """(segment, mask [BLOCKS] of this program's blocks in it, their fp32 halves [BLOCKS, 8] x 2
    (``nvfp4_triton._load_halves``), their block indices in the output) of this program."""
    program = tl.program_id(0).to(tl.int64)
    segment = _find_segment(table_ptr, n_segments, program, SEARCH_STEPS)
    first_program = tl.load(table_ptr + segment)
    source_block = tl.load(table_ptr + n_segments + segment)
    output_block = tl.load(table_ptr + 2 * n_segments + segment)
    n_blocks = tl.load(table_ptr + 3 * n_segments + segment)
    rows = (program - first_program) * BLOCKS + tl.arange(0, BLOCKS)
    mask = rows < n_blocks
    low, high = _load_halves(base_ptr, source_block + rows, mask)
    return segment, mask, low, high, output_block + rows


@triton.jit
def _segments_amax_kernel(base_ptr, table_ptr, amax_ptr, n_segments,
                          SEARCH_STEPS: tl.constexpr, BLOCKS: tl.constexpr):
    """amax[segment] = max(amax[segment], max |x| of this program's blocks); amax starts at 0."""
    segment, mask, low, high, _ = _segment_tile(base_ptr, table_ptr, n_segments, SEARCH_STEPS, BLOCKS)
    magnitude = tl.maximum(tl.max(tl.abs(low), axis=1), tl.max(tl.abs(high), axis=1))
    tl.atomic_max(amax_ptr + segment, tl.max(magnitude, axis=0))


@triton.jit
def _segments_fake_quant_kernel(base_ptr, table_ptr, amax_ptr, out_ptr, n_segments,
                                SCALE_MAX: tl.constexpr, FOUR_OVER_SIX: tl.constexpr,
                                SEARCH_STEPS: tl.constexpr, BLOCKS: tl.constexpr):
    """Fake-quantize this program's blocks with their segment's amax into the output."""
    segment, mask, low, high, output_rows = _segment_tile(base_ptr, table_ptr, n_segments, SEARCH_STEPS, BLOCKS)
    _, _, _, values_low, values_high, negative_low, negative_high = _quantize_tile(
        low, high, tl.load(amax_ptr + segment), SCALE_MAX, FOUR_OVER_SIX, BLOCKS)
    _store_halves(out_ptr, output_rows, mask, _signed(values_low, negative_low), _signed(values_high, negative_high))


def _block_aligned_copy(segment: torch.Tensor, base: torch.Tensor, block_bytes: int) -> torch.Tensor:
    """A copy of ``segment`` that starts a whole number of blocks (``block_bytes``) away from
    ``base``: a plain clone is aligned to the allocator's boundary, which a ``base`` inside a larger
    allocation need not be, so the copy is placed at the right element of a slightly larger buffer."""
    buffer = torch.empty(segment.numel() + block_bytes // segment.element_size(), dtype=segment.dtype,
                         device=segment.device)
    shift = ((base.data_ptr() - buffer.data_ptr()) % block_bytes) // segment.element_size()
    return buffer[shift:shift + segment.numel()].view_as(segment).copy_(segment)


def segment_table(segments: Sequence[torch.Tensor], output_starts: Sequence[int], blocks: int = _BLOCKS_PER_PROGRAM):
    """(base tensor, table int64 [4, n] on the segments' device, program count) of ``segments``:
    contiguous CUDA tensors of one dtype, each of a multiple of 16 elements, whose outputs start at
    the element offsets ``output_starts`` (multiples of 16). A segment not a whole number of blocks
    away from the first is copied to a place that is (kept alive by the returned base tuple's
    second item)."""
    base = segments[0]
    block_bytes = BLOCK_SIZE * base.element_size()
    copies = []
    firsts, sources, outputs, counts = [], [], [], []
    program = 0
    for segment, output_start in zip(segments, output_starts):
        offset = segment.data_ptr() - base.data_ptr()
        if offset % block_bytes:
            segment = _block_aligned_copy(segment, base, block_bytes)
            copies.append(segment)
            offset = segment.data_ptr() - base.data_ptr()
        n_blocks = segment.numel() // BLOCK_SIZE
        firsts.append(program)
        sources.append(offset // block_bytes)
        outputs.append(output_start // BLOCK_SIZE)
        counts.append(n_blocks)
        program += triton.cdiv(n_blocks, blocks)
    # Pinned and non-blocking: the copy to the GPU does not wait for the work queued before it.
    table = torch.tensor([firsts, sources, outputs, counts], dtype=torch.int64, pin_memory=base.is_cuda)
    return (base, copies), table.to(base.device, non_blocking=True), program


def _search_steps(n_segments: int) -> int:
    return max(1, (n_segments - 1).bit_length())


def segments_amax(segments: Sequence[torch.Tensor]) -> torch.Tensor:
    """max |segment| of each segment as fp32 [n] (0 for an empty one), in one launch after a fill."""
    (base, _copies), table, programs = segment_table(segments, [0] * len(segments))
    amax = torch.zeros(len(segments), dtype=torch.float32, device=base.device)
    if programs:
        _segments_amax_kernel[(programs,)](base, table, amax, len(segments),
                                           SEARCH_STEPS=_search_steps(len(segments)),
                                           BLOCKS=_BLOCKS_PER_PROGRAM, num_warps=_NUM_WARPS)
    return amax


def fake_quantize_segments(segments: Sequence[torch.Tensor], amax: torch.Tensor, four_over_six: bool,
                           out: torch.Tensor, output_starts: Sequence[int]) -> torch.Tensor:
    """Write each segment's NVFP4 fake quant (with its amax, fp32 [n] on the device) into the
    contiguous ``out`` (the segments' dtype) from element ``output_starts[i]`` (a multiple of 16) on."""
    (base, _copies), table, programs = segment_table(segments, output_starts)
    if programs:
        _segments_fake_quant_kernel[(programs,)](
            base, table, amax, out, len(segments),
            SCALE_MAX=FOUR_OVER_SIX_E4M3_MAX if four_over_six else E4M3_MAX, FOUR_OVER_SIX=four_over_six,
            SEARCH_STEPS=_search_steps(len(segments)), BLOCKS=_BLOCKS_PER_PROGRAM,
            num_warps=_NUM_WARPS, enable_fp_fusion=False)
    return out
