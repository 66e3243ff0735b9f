"""Global metrics of a step and the iteration log (stdout lines, optional TensorBoard / W&B)."""

import json
import sys
import time

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


class IterationLog:
    """Megatron-style iteration lines on rank 0, plus optional TensorBoard and W&B sinks.

    ``log(iteration, values)`` prints ``iteration   10/100 | lr 1.000E-05 | kl 1.234E-03 | ...``
    (and, when stdout is a terminal, a progress bar on stderr between lines).
    """

    def __init__(self, total_iters: int, tensorboard_dir: str | None = None, wandb_project: str | None = None,
                 run_config: dict | None = None):
        self.total_iters = total_iters
        self.rank0 = not dist.is_initialized() or dist.get_rank() == 0
        self.interactive = self.rank0 and sys.stderr.isatty()
        self.writer = self.wandb = None
        if self.rank0 and tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("'logging.tensorboard_dir' needs the tensorboard package: "
                                  "pip install tensorboard") from err
            self.writer = SummaryWriter(tensorboard_dir)
        if self.rank0 and wandb_project:
            try:
                import wandb
            except ImportError as err:
                raise ImportError("'logging.wandb_project' needs the wandb package: pip install wandb") from err
            self.wandb = wandb.init(project=wandb_project, config=run_config)

    def print(self, text: str) -> None:
        """A line on rank 0's stdout."""
        if self.rank0:
            if self.interactive:
                sys.stderr.write("\r\033[K")
            print(text, flush=True)

    def progress(self, iteration: int) -> None:
        """Redraw the progress bar (terminals only)."""
        if self.interactive:
            done = int(30 * iteration / max(self.total_iters, 1))
            sys.stderr.write(f"\r[{'#' * done}{'.' * (30 - done)}] {iteration}/{self.total_iters}")
            sys.stderr.flush()

    def log(self, iteration: int, values: dict[str, float], prefix: str = "", total: int | None = None) -> None:
        """Print one line of ``values`` (at ``iteration`` of ``total``, default the run's) and send
        them to the sinks under ``prefix``."""
        parts = [f"{prefix}iteration {iteration:>6d}/{total or self.total_iters}"]
        for name, value in values.items():
            parts.append(f"{name} {value:.4E}" if isinstance(value, float) else f"{name} {value}")
        self.print(" | ".join(parts))
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, int | float):
                    self.writer.add_scalar(f"{prefix}{name}".strip(), value, iteration)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}{name}".strip(): value for name, value in values.items()}, step=iteration)

    def summary(self, record: dict) -> None:
        """A final JSON line (machine-readable) on rank 0."""
        self.print("summary " + json.dumps(record, sort_keys=True))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


class StepTimer:
    """Wall time of a step (synchronising the GPU first) and tokens per second."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = time.perf_counter()

    def lap(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        return elapsed


def memory_gib(device: torch.device) -> float | None:
    """Peak allocated GPU memory in GiB since the last reset (None on the CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30
