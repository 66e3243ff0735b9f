"""The micro-batches one data-parallel rank trains on in one optimizer step."""

import operator

import torch


def step_micro_batches(dataset, step: int, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                       dp_size: int) -> list[dict[str, torch.Tensor]]:
    """Rank ``dp_rank``'s micro-batches of optimizer step ``step`` (0-based), in order.

    The global batch of step ``k`` is samples ``k * G ... k * G + G - 1`` of ``dataset``
    (``G = global_batch_size``); row ``g`` of it is sample ``k * G + g`` whatever ``dp_size``. With
    ``n = G // (micro_batch_size * dp_size)`` micro-batches per rank, micro-batch ``m`` of rank ``r``
    holds rows ``m * micro_batch_size * dp_size + r * micro_batch_size + [0, micro_batch_size)``.
    Each micro-batch is a dict of the samples' tensors stacked to ``[micro_batch_size, ...]``
    (``[micro_batch_size, seq_length]`` for :func:`build_dataset`'s samples).
    """
    step, global_batch_size, micro_batch_size, dp_rank, dp_size = map(
        operator.index, (step, global_batch_size, micro_batch_size, dp_rank, dp_size))
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if micro_batch_size < 1 or dp_size < 1 or global_batch_size < 1:
        raise ValueError(f"global_batch_size ({global_batch_size}), micro_batch_size ({micro_batch_size}) and "
                         f"the data-parallel size ({dp_size}) must be >= 1")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"data-parallel rank {dp_rank} is outside [0, {dp_size})")
    rows_per_micro = micro_batch_size * dp_size
    if global_batch_size % rows_per_micro:
        raise ValueError(f"global_batch_size ({global_batch_size}) must be a multiple of micro_batch_size "
                         f"({micro_batch_size}) x the data-parallel size ({dp_size}) = {rows_per_micro}; "
                         f"change global_batch_size or micro_batch_size")
    first = step * global_batch_size + dp_rank * micro_batch_size
    micro_batches = []
    for micro in range(global_batch_size // rows_per_micro):
        start = first + micro * rows_per_micro
        samples = [dataset[index] for index in range(start, start + micro_batch_size)]
        micro_batches.append({key: torch.stack([sample[key] for sample in samples]) for key in samples[0]})
    return micro_batches
