"""Global metrics of the micro-batch reports of a step (PTQ and final validation), and peak memory."""


import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..distill import sum_reports

METRICS = ("loss", "kl", "student ce", "teacher ce", "top1 agreement")
"""What the loss reports per micro-batch as ``[sum, count]`` (see ``distill.losses``)."""


def global_averages(reports: list[dict], device: torch.device) -> dict[str, float]:
    """Token averages over the whole global batch of the micro-batch ``reports`` of this rank.

    Reports exist on the last pipeline stage only; every tensor-parallel rank holds the same
    (already TP-reduced) totals. Sums are all-reduced over data parallelism and the pipeline
    group, so every rank returns the same dict; a metric no micro-batch reported is left out.
    """
    totals = sum_reports(reports)
    table = torch.zeros(len(METRICS), 2, dtype=torch.float64, device=device)
    for row, name in enumerate(METRICS):
        if name in totals:
            table[row] = totals[name].to(device, torch.float64)
    if dist.is_initialized():
        dist.all_reduce(table, group=parallel_state.get_data_parallel_group())
        dist.all_reduce(table, group=parallel_state.get_pipeline_model_parallel_group())
    return {name: (table[row, 0] / table[row, 1]).item()
            for row, name in enumerate(METRICS) if table[row, 1] > 0}


def memory_gib(device: torch.device) -> float | None:
    """Peak allocated GPU memory in GiB since the last reset (None on the CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30
