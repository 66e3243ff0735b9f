"""What the plugin pieces of one ``pretrain`` call share on this rank.

Megatron's loop calls the model provider, the dataset provider and the forward step as plain
functions; :class:`RunState` holds what they hand to each other: the device, the QAD sections
of the arguments, the built chunks (teacher-student stages or plain models), the loss, the
datasets, and the PTQ figures. One state exists per ``pretrain`` call: :func:`RunState.start`
makes it, :func:`RunState.get` returns it, :func:`RunState.end` drops it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.num_microbatches_calculator import get_num_microbatches

from .. import quantize
from ..progress import Progress
from ..data import build_dataset, step_micro_batches
from ..distill import DistillationLoss, distillation_step
from ..distill.pipeline import chunk_iterators
from ..models import causal_attention_mask
from .arguments import QADSections
from .divergence import DivergenceGuard
from .metrics import global_averages


@dataclass
class RunState:
    """One ``pretrain`` call's shared state on this rank (see the module docstring).

    ``device``: this rank's device; ``sections``: the QAD settings; ``backend``: the NVFP4
    backend ("emulated" or "te"); ``loss``: the training loss; ``seq_length``,
    ``micro_batch_size``, ``global_batch_size``, ``vocab_size``, ``eval_iters``: Megatron's; ``cache_dir``: where
    generated data is kept; ``guard``: the divergence policy (the training losses go to it, and the
    models' gradient finalization is its); ``communicator``: the pipeline's p2p communicator (its config is set
    to the student's when the first stage is built); ``student_load``: a student checkpoint to
    start from (no calibration then). Filled while the run goes: ``chunks``, ``ptq`` (validation metrics
    after calibration, None on a resumed run)."""

    device: torch.device
    sections: QADSections
    backend: str
    loss: DistillationLoss
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    vocab_size: int
    eval_iters: int
    cache_dir: str | None
    rank0: bool
    guard: DivergenceGuard
    communicator: object = None
    student_load: str | None = None
    chunks: list = field(default_factory=list)
    pending_teacher_loads: list = field(default_factory=list)
    ptq: dict | None = None
    reports: dict = field(default_factory=dict)
    start_iteration: int = 0
    teacher_gib: float | None = None
    _datasets: tuple | None = None

    _current: ClassVar[RunState | None] = None

    @classmethod
    def start(cls, **values) -> RunState:
        """Make the state of a new ``pretrain`` call."""
        cls._current = cls(**values)
        return cls._current

    @classmethod
    def get(cls) -> RunState:
        if cls._current is None:
            raise RuntimeError("no QAD run is in progress: start pretrain through megatron_qad.train")
        return cls._current

    @classmethod
    def end(cls) -> None:
        cls._current = None

    def print(self, text: str) -> None:
        """A line on rank 0's stdout."""
        if self.rank0:
            print(text, flush=True)

    # -- data ------------------------------------------------------------------------------------

    def datasets(self):
        """(train, validation) datasets of the ``data`` section (built once)."""
        if self._datasets is None:
            data = self.sections.data
            sampler = self.teacher_sampler()
            built = []
            for split in ("train", "validation"):
                sources = data.validation_sources if split == "validation" and data.validation_sources else data.sources
                built.append(build_dataset(sources, split, self.seq_length, self.vocab_size, data.seed,
                                           cache_dir=data.cache_dir or self.cache_dir, teacher_sampler=sampler))
            self._datasets = tuple(built)
        return self._datasets

    def use_datasets(self, train, validation) -> None:
        """Take (train, validation) datasets built elsewhere (Megatron's GPT datasets)."""
        self._datasets = (train, validation)

    def teacher_sampler(self):
        """Full-vocabulary next-token logits of the teacher, for teacher-generated data (PP=1, one
        chunk, teacher-student stages only); None otherwise."""
        if len(self.chunks) != 1 or parallel_state.get_pipeline_model_parallel_world_size() > 1:
            return None
        teacher = getattr(self.chunks[0], "teacher", None)
        if teacher is None:
            return None
        device = self.device

        def sample_logits(prefix: torch.Tensor) -> torch.Tensor:
            prefix = prefix.to(device)
            positions = torch.arange(prefix.shape[1], device=device).expand_as(prefix)
            with torch.no_grad():
                logits = teacher(prefix, positions, causal_attention_mask(prefix.shape[1], device))
                return tensor_parallel.gather_from_tensor_model_parallel_region(logits).float().cpu()

        return sample_logits

    def batches(self, dataset, step: int) -> list[dict]:
        """This rank's micro-batches of global batch ``step`` of ``dataset`` (Megatron's order)."""
        return step_micro_batches(dataset, step, self.global_batch_size, self.micro_batch_size,
                                  parallel_state.get_data_parallel_rank(),
                                  parallel_state.get_data_parallel_world_size())

    # -- the loss curve --------------------------------------------------------------------------

    def record(self, iteration: int, report: dict) -> None:
        """Keep one training micro-batch's metrics (``{name: [sum, count]}``) of ``iteration``
        (0-based, Megatron's), for :meth:`loss_curve`."""
        self.reports.setdefault(iteration, []).append({name: value.detach().cpu() for name, value in report.items()})

    def loss_curve(self, first: int, last: int) -> list[dict]:
        """Global-batch averages of the recorded metrics for iterations ``first`` .. ``last - 1``
        (0-based), as ``[{"iteration": i + 1, "kl": ..., ...}]``; every rank must call it."""
        return [{"iteration": iteration + 1, **global_averages(self.reports.get(iteration + 1, []), self.device)}
                for iteration in range(first, last)]

    # -- PTQ and validation ----------------------------------------------------------------------

    def step(self, batches, loss: DistillationLoss, forward_only: bool = True) -> list[dict]:
        """One global batch's micro-batches through the schedule, forward only."""
        with quantize.reuse_quantized_weights(self.chunks):
            return distillation_step(self.chunks, chunk_iterators(self.chunks, batches), get_num_microbatches(),
                                     self.micro_batch_size, self.seq_length, loss, forward_only=forward_only)

    def evaluate(self, dataset) -> dict[str, float]:
        """KL, CEs and top-1 agreement of the student against the teacher over the first
        ``eval_iters`` global batches of ``dataset`` (the same batches every time)."""
        loss, reports = DistillationLoss("kl"), []
        was_training = [chunk.training for chunk in self.chunks]
        for chunk in self.chunks:
            chunk.eval()
        try:
            for step in range(self.eval_iters):
                reports += self.step(self.batches(dataset, step), loss)
        finally:
            for chunk, training in zip(self.chunks, was_training):
                chunk.train(training)
        return global_averages(reports, self.device)

    def calibrate_if_fresh(self, iteration: int, train, validation) -> None:
        """On a fresh run (Megatron loaded no checkpoint: ``iteration`` 0), set the static scales
        from ``distill.calibration_iters`` global batches of the training data and evaluate the
        PTQ student; a resumed run keeps the scales its checkpoint holds. Rank 0 prints the
        calibration's progress (:class:`megatron_qad.progress.Progress`)."""
        if iteration != 0 or self.student_load:
            where = f"iteration {iteration}" if iteration else self.student_load
            self.print(f"student from {where}: its calibrated scales are kept")
            return
        students = [chunk.student for chunk in self.chunks]
        iters = self.sections.distill.calibration_iters
        progress = Progress("PTQ calibration", iters, unit="global batches")
        with quantize.calibration(students):
            for step in range(iters):
                self.step(self.batches(train, step), DistillationLoss("kl"))
                progress.advance(1, tokens=self.global_batch_size * self.seq_length)
        self.ptq = self.evaluate(validation)
        self.print("validation (PTQ) | " + " | ".join(f"{name} {value:.4E}" for name, value in self.ptq.items()))


@contextlib.contextmanager
def run_state(**values):
    """:meth:`RunState.start` for the block, :meth:`RunState.end` after it."""
    state = RunState.start(**values)
    try:
        yield state
    finally:
        RunState.end()
