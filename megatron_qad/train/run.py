"""A QAD (or PTQ / QAT) run from a recipe: teacher, student, calibration, training, checkpoints.

    summary = run(config, "train")   # or "ptq": calibrate and evaluate only; "eval": see below

On every rank of the job (torchrun / SLURM, or one process):
  1. the teacher's dist checkpoint (``teacher.checkpoint``) is loaded, after training one from
     scratch there first when it is missing and ``teacher.pretrain_iters`` > 0 (small models);
  2. the student is built at the same layout, loaded from the same checkpoint and quantized by
     the recipe's ``quantization`` policy;
  3. fresh runs calibrate the static scales over ``distill.calibration_iters`` global batches
     (PTQ) and evaluate the PTQ student on held-out data (the baseline); a run whose
     ``checkpoint.save`` holds a checkpoint resumes from it instead;
  4. ``training.train_iters`` optimizer steps of the ``distill.loss`` (KL for QAD, CE for QAT)
     through megatron.core's schedules, DDP and Adam, logged every ``training.log_interval``,
     evaluated every ``training.eval_interval``, checkpointed every ``checkpoint.save_interval``
     and at the end.
``eval`` skips 3-4: it loads the run's newest student (training checkpoint, else ``ptq/``) and
reports its validation metrics and per-layer weight errors (also as ``checkpoint.save/eval.json``).
Returns (on every rank) a summary dict: the PTQ and final validation metrics, the relative KL
reduction and the wall time.
"""

import contextlib
import importlib.metadata
import time
from pathlib import Path
from typing import Literal

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.num_microbatches_calculator import (get_num_microbatches, init_num_microbatches_calculator,
                                                       unset_num_microbatches_calculator)

from .. import parallel, quantize
from ..config import ConfigError, QADConfig, to_dict
from ..data import build_dataset, step_micro_batches, validate_sources
from ..distill import DistillationLoss, TeacherStudentStage, chunk_iterators, distillation_step
from ..models import DTYPES, build_model_chunks, causal_attention_mask
from . import checkpointing
from .metrics import IterationLog, StepTimer, global_averages, memory_gib
from .optimizer import build_optimizer, resolve_distributed_optimizer, wrap_ddp


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """The GPU's compute capability (major, minor); None on the CPU."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` (a pip package name), None when it is missing."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def nvfp4_backend(config: QADConfig, device: torch.device) -> str:
    """The backend ("emulated" or "te") that runs the student's NVFP4 GEMMs on ``device``, from
    ``quantization.backend``; ConfigError for "te" where it cannot run."""
    return quantize.backend.select_backend(config.quantization.backend, device_capability(device),
                                           installed_version("transformer_engine"),
                                           te_spec_model=config.model.transformer_impl == "transformer_engine")


def check_runnable(config: QADConfig, device: torch.device) -> None:
    """Errors a run would otherwise hit late, named by key."""
    if device.type == "cpu" and config.model.params_dtype != "float32":
        raise ConfigError("training on the CPU needs 'model.params_dtype: float32' (megatron.core's BF16 "
                          "mixed-precision optimizer runs on GPUs only); set model.params_dtype=float32")
    if device.type == "cpu" and config.training.use_distributed_optimizer:
        raise ConfigError("'training.use_distributed_optimizer: true' needs GPUs (megatron.core's distributed "
                          "optimizer accepts CUDA parameters only); set it to null or false on the CPU")
    nvfp4_backend(config, device)
    if config.teacher.checkpoint is None:
        raise ConfigError("'teacher.checkpoint' is not set: give the megatron.core dist checkpoint of the "
                          "BF16 teacher (or a directory to train a small one in, with teacher.pretrain_iters)")
    try:
        validate_sources(config.data.sources, config.model.vocab_size)
        if config.data.validation_sources:
            validate_sources(config.data.validation_sources, config.model.vocab_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None


class Run:
    """One run's state on this rank (see the module docstring for the sequence)."""

    def __init__(self, config: QADConfig, context: parallel.ParallelContext):
        self.config = config
        self.device = context.device
        self.rank = context.rank
        self.dp_size = context.data_parallel_size
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.seq_length = config.model.seq_length
        self.params_dtype = DTYPES[config.model.params_dtype]
        training = config.training
        rows = training.micro_batch_size * self.dp_size
        if training.global_batch_size % rows:
            raise ConfigError(
                f"'training.global_batch_size' ({training.global_batch_size}) must be a multiple of "
                f"'training.micro_batch_size' ({training.micro_batch_size}) x the data-parallel size "
                f"({self.dp_size}) = {rows}; change one of them or the number of processes")
        init_num_microbatches_calculator(self.rank, None, training.global_batch_size,
                                         training.micro_batch_size, self.dp_size)
        self.log = IterationLog(training.train_iters, config.logging.tensorboard_dir,
                                config.logging.wandb_project, to_dict(config))

    # -- data ------------------------------------------------------------------------------------

    def batches(self, dataset, step: int) -> list[dict]:
        """This rank's micro-batches of global batch ``step`` of ``dataset``."""
        t = self.config.training
        return step_micro_batches(dataset, step, t.global_batch_size, t.micro_batch_size,
                                  self.dp_rank, self.dp_size)

    def step(self, chunks, batches, loss: DistillationLoss, forward_only: bool = False) -> list[dict]:
        """The micro-batches of one global batch through the schedule (weights fixed throughout)."""
        reuse = (quantize.reuse_quantized_weights(chunks) if self.config.quantization.reuse_quantized_weights
                 else contextlib.nullcontext())
        with reuse:
            return distillation_step(chunks, chunk_iterators(chunks, batches),
                                     get_num_microbatches(), self.config.training.micro_batch_size,
                                     self.seq_length, loss, forward_only=forward_only)

    def dataset(self, split: str, teacher_sampler=None):
        data = self.config.data
        cache_dir = data.cache_dir or self.config.checkpoint.save
        sources = data.validation_sources if split == "validation" and data.validation_sources else data.sources
        return build_dataset(sources, split, self.seq_length, self.config.model.vocab_size, data.seed,
                             cache_dir=cache_dir, teacher_sampler=teacher_sampler)

    # -- models ----------------------------------------------------------------------------------

    def build_chunks(self):
        return build_model_chunks(self.config.model, self.config.parallel, self.device)

    def pretrain_teacher(self, directory: str) -> None:
        """Train a teacher from scratch (cross entropy on the data) and save it at ``directory``."""
        iters = self.config.teacher.pretrain_iters
        self.log.print(f"teacher: no checkpoint at {directory}; training one from scratch for {iters} iterations")
        chunks = self.build_chunks()
        ddp_chunks = wrap_ddp(chunks, self.distributed_optimizer())
        optimizer, scheduler = build_optimizer(ddp_chunks, self.config.training, self.params_dtype,
                                               self.distributed_optimizer(), lr=self.config.teacher.pretrain_lr,
                                               train_iters=iters)
        dataset = self.dataset("train")
        loss = DistillationLoss("ce")
        for iteration in range(iters):
            reports = self.optimizer_step(ddp_chunks, optimizer, scheduler, self.batches(dataset, iteration), loss)
            if (iteration + 1) % self.config.training.log_interval == 0 or iteration + 1 == iters:
                self.log.log(iteration + 1, {"ce": global_averages(reports, self.device)["student ce"]},
                             prefix="teacher pre-training ", total=iters)
        checkpointing.save_model(chunks, directory)

    def teacher_sampler(self, teachers):
        """Full-vocabulary next-token logits of the teacher, for teacher-generated data (PP=1 only)."""
        if len(teachers) > 1 or parallel_state.get_pipeline_model_parallel_world_size() > 1:
            return None
        teacher = teachers[0]

        def sample_logits(prefix: torch.Tensor) -> torch.Tensor:
            prefix = prefix.to(self.device)
            positions = torch.arange(prefix.shape[1], device=self.device).expand_as(prefix)
            with torch.no_grad():
                logits = teacher(prefix, positions, causal_attention_mask(prefix.shape[1], self.device))
                return tensor_parallel.gather_from_tensor_model_parallel_region(logits).float().cpu()

        return sample_logits

    def distributed_optimizer(self) -> bool:
        return resolve_distributed_optimizer(self.config.training, self.dp_size, self.device)

    # -- steps -----------------------------------------------------------------------------------

    def optimizer_step(self, ddp_chunks, optimizer, scheduler, batches, loss) -> list[dict]:
        for chunk in ddp_chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        reports = self.step(ddp_chunks, batches, loss)
        self.last_update = optimizer.step()
        scheduler.step(increment=1)
        return reports

    def evaluate(self, chunks, dataset) -> dict[str, float]:
        """Validation metrics over ``training.eval_iters`` global batches (forward only)."""
        loss = DistillationLoss("kl")
        reports = []
        for step in range(self.config.training.eval_iters):
            reports += self.step(chunks, self.batches(dataset, step), loss, forward_only=True)
        return global_averages(reports, self.device)

    # -- the run ---------------------------------------------------------------------------------

    def execute(self, mode: Literal["train", "ptq", "eval"]) -> dict:
        config, start_time = self.config, time.perf_counter()
        teacher_dir = config.teacher.checkpoint
        if not (Path(teacher_dir) / "metadata.json").is_file() and config.teacher.pretrain_iters:
            self.pretrain_teacher(teacher_dir)
        teachers = self.build_chunks()
        checkpointing.load_model(teachers, teacher_dir)
        teacher_gib = sum(p.numel() * p.element_size() for chunk in teachers for p in chunk.parameters()) / 2**30
        self.log.print(f"teacher: {teacher_gib:.3f} GiB of {config.model.params_dtype} weights on this rank "
                       f"(frozen: no gradients, no optimizer state)")
        train_data = self.dataset("train", self.teacher_sampler(teachers))
        validation_data = self.dataset("validation", self.teacher_sampler(teachers))

        students = self.build_chunks()
        checkpointing.load_model(students, teacher_dir)
        backend = nvfp4_backend(config, self.device)
        report = quantize.apply(students, config.quantization.to_policy(), backend=backend)
        self.log.print(report.format_table().splitlines()[-1])
        if backend == "te":
            self.log.print("NVFP4 GEMMs: Transformer Engine's, on FP4 tensor cores (activation scales per call; "
                           "the calibrated input amaxes are kept for export)")
        stages = [TeacherStudentStage(student, teacher) for student, teacher in zip(students, teachers)]

        run_dir = config.checkpoint.save
        if mode == "eval":
            return self.evaluate_student(students, stages, validation_data, start_time)
        if run_dir:
            checkpointing.write_resolved_config(run_dir, to_dict(config))
        resume_from = checkpointing.latest_training_checkpoint(run_dir) if config.checkpoint.resume else None
        summary = {"mode": mode, "ptq": None, "teacher GiB": round(teacher_gib, 3)}
        if resume_from is None:
            with quantize.calibration(students):
                for step in range(config.distill.calibration_iters):
                    self.step(stages, self.batches(train_data, step), DistillationLoss("kl"), forward_only=True)
            summary["ptq"] = self.evaluate(stages, validation_data)
            self.log.log(0, summary["ptq"], prefix="validation (PTQ) ")
        if mode == "ptq":
            if run_dir:
                checkpointing.save_model(students, f"{run_dir}/ptq")
            summary["final"] = summary["ptq"]
            return self.finish(summary, start_time)

        ddp_chunks = wrap_ddp(stages, self.distributed_optimizer())
        optimizer, scheduler = build_optimizer(ddp_chunks, config.training, self.params_dtype,
                                               self.distributed_optimizer())
        start = 0
        if resume_from is not None:
            start = checkpointing.load_training(resume_from, ddp_chunks, optimizer, scheduler)
            self.log.print(f"resumed from {resume_from} after iteration {start}")
        summary["train"] = self.train(ddp_chunks, optimizer, scheduler, train_data, validation_data, start)
        if self.iteration != config.training.train_iters:
            summary["stopped_at"] = self.iteration
            return self.finish(summary, start_time)
        summary["final"] = self.evaluate(ddp_chunks, validation_data)
        self.log.log(config.training.train_iters, summary["final"], prefix="validation (QAD) ")
        if run_dir:
            checkpointing.save_training(run_dir, config.training.train_iters, ddp_chunks, optimizer, scheduler)
        return self.finish(summary, start_time)

    def evaluate_student(self, students, stages, validation_data, start_time: float) -> dict:
        """``eval``: load the run's student, evaluate it against the teacher on held-out data, and
        report every linear layer's weight quantization error; JSON at ``checkpoint.save/eval.json``."""
        run_dir = self.config.checkpoint.save
        source = checkpointing.student_checkpoint(run_dir)
        checkpointing.load_model(students, source)
        report = quantize.report(students, self.config.quantization.to_policy())
        metrics = self.evaluate(stages, validation_data)
        self.log.print(report.format_table())
        self.log.log(0, metrics, prefix="validation (student) ", total=0)
        summary = {"mode": "eval", "student": str(source), "final": metrics,
                   "layers": [{"name": row.name, "kind": row.kind, "weight": row.weight_format,
                               "input": row.input_format, "params": row.params,
                               "rel_mse": row.rel_mse_4over6 if row.weight_format == "nvfp4_4over6"
                               else row.rel_mse_nvfp4} for row in report.rows]}
        checkpointing.write_json(Path(run_dir) / "eval.json", summary)
        return self.finish(summary, start_time)

    def train(self, ddp_chunks, optimizer, scheduler, train_data, validation_data, start: int) -> list[dict]:
        """Optimizer steps ``start`` .. ``train_iters - 1``; returns the logged lines' values."""
        config, t = self.config, self.config.training
        d = config.distill
        loss = DistillationLoss(d.loss, alpha=d.alpha, temperature=d.temperature)
        tokens_per_step = t.global_batch_size * self.seq_length
        timer, history = StepTimer(self.device), []
        self.iteration = start
        for iteration in range(start, t.train_iters):
            reports = self.optimizer_step(ddp_chunks, optimizer, scheduler, self.batches(train_data, iteration), loss)
            done = self.iteration = iteration + 1
            self.log.progress(done)
            if done % t.log_interval == 0 or done == t.train_iters:
                seconds = timer.lap() / (done - (history[-1]["iteration"] if history else start))
                values = {"lr": optimizer.param_groups[0]["lr"], **global_averages(reports, self.device),
                          "grad norm": float(self.last_update[1] or 0.0),
                          "tokens/s": round(tokens_per_step / seconds), "step s": round(seconds, 3)}
                memory = memory_gib(self.device)
                if memory is not None:
                    values["mem GiB"] = round(memory, 2)
                self.log.log(done, values)
                history.append({"iteration": done, **values})
            if t.eval_interval and done % t.eval_interval == 0 and done != t.train_iters:
                self.log.log(done, self.evaluate(ddp_chunks, validation_data), prefix="validation ")
            interval = config.checkpoint.save_interval
            exiting = bool(t.exit_interval) and done % t.exit_interval == 0 and done != t.train_iters
            if config.checkpoint.save and done != t.train_iters and (exiting or (interval and done % interval == 0)):
                checkpointing.save_training(config.checkpoint.save, done, ddp_chunks, optimizer, scheduler)
            if exiting:
                self.log.print(f"exiting after iteration {done} (training.exit_interval)")
                break
        return history

    def finish(self, summary: dict, start_time: float) -> dict:
        ptq, final = summary.get("ptq"), summary.get("final")
        if ptq and final and "kl" in ptq and "kl" in final and ptq["kl"] > 0:
            summary["kl_reduction"] = 1.0 - final["kl"] / ptq["kl"]
        summary["seconds"] = round(time.perf_counter() - start_time, 1)
        peak = memory_gib(self.device)
        if peak is not None:
            summary["peak GiB"] = round(peak, 2)
        self.log.summary({key: value for key, value in summary.items() if key not in ("train", "layers")})
        self.log.close()
        return summary


def run(config: QADConfig, mode: Literal["train", "ptq", "eval"] = "train") -> dict:
    """Set up the process group, run, tear down; see the module docstring."""
    context = parallel.initialize(config.parallel, seed=config.model.seed)
    try:
        check_runnable(config, context.device)
        return Run(config, context).execute(mode)
    finally:
        unset_num_microbatches_calculator()
        parallel.destroy()
