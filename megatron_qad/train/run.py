"""A run from a YAML recipe, compiled into a Megatron-LM command line (see :mod:`.arguments`).

    summary = run(config, "train")   # or "ptq": calibrate and evaluate only; "eval": see below

``train``: when ``teacher.checkpoint`` does not exist (or holds a teacher whose training stopped:
it resumes) and ``teacher.pretrain_iters`` > 0, a small teacher is first trained from scratch there
(``pretrain`` in ``--qad-mode teacher``); then QAD (or QAT, ``distill.loss: ce``) runs through
``megatron.training.pretrain`` (:func:`.megatron.run_pretrain`), checkpointing into
``checkpoint.save`` in Megatron-LM's layout and resuming from it.
``ptq``: the same set-up with no training steps (Megatron's ``--skip-train``): calibrate, report the
PTQ student's validation metrics, and save the student as ``checkpoint.save/ptq``.
``eval``: the run's newest student (its latest training checkpoint, else ``ptq/``) against the
teacher on held-out data, with every linear layer's weight quantization error
(``checkpoint.save/eval.json``).

Returns (on every rank) the summary dict: the PTQ and final validation metrics, the relative KL
reduction, the wall time; ``stopped_at`` when Megatron ended the run early.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal

import torch
import yaml

from .. import parallel
from ..checkpoint_tracker import has_tracker
from ..config import QADConfig, to_dict
from . import writer_lock
from .arguments import recipe_to_argv
from .checkpointing import resolve_checkpoint, student_checkpoint
from .megatron import run_pretrain
from .preflight import check_runnable, check_teacher_checkpoint


def _uses_gpu() -> bool:
    return torch.cuda.is_available()


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _resolved_recipe(config: QADConfig) -> str:
    """The resolved recipe in a temporary file of this rank: the ``--qad-recipe`` of the compiled
    command line. A run copies it into its ``--save`` directory only once its checks passed
    (``config.yaml`` and ``launches/``: :mod:`.launches`)."""
    handle = tempfile.NamedTemporaryFile("w", prefix="qad-recipe-", suffix=".yaml", delete=False)
    with handle:
        handle.write(yaml.safe_dump(to_dict(config), sort_keys=False))
    return handle.name


def _without_load(argv: list[str]) -> list[str]:
    """``argv`` without ``--load DIR`` (PTQ and evaluation resume no training state)."""
    if "--load" not in argv:
        return argv
    index = argv.index("--load")
    return argv[:index] + argv[index + 2:]


def run(config: QADConfig, mode: Literal["train", "ptq", "eval"] = "train") -> dict:
    """Run ``config`` in ``mode``; see the module docstring."""
    device = torch.device("cuda" if _uses_gpu() else "cpu")
    check_runnable(config, device)
    check_teacher_checkpoint(config)
    if config.checkpoint.resume and has_tracker(config.checkpoint.save):
        resolve_checkpoint(config.checkpoint.save)  # a damaged tracker is named before Megatron reads it
    if config.parallel.tensor_model_parallel_size > 1 or config.parallel.context_parallel_size > 1:
        # Megatron's requirement for overlapping TP / CP communication before Blackwell GPUs; it
        # must be set before CUDA starts in this process (it does not start before this).
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    recipe = _resolved_recipe(config)
    common = dict(recipe_path=recipe, use_gpu=_uses_gpu(), world_size=_world_size())
    # One process group for the teacher's and the student's runs; checkpoint.save is this run's
    # from before the teacher's training on.
    try:
        with (parallel.process_group(timeout_minutes=config.parallel.distributed_timeout_minutes),
              writer_lock.hold(config.checkpoint.save, "checkpoint.save")):
            return _run(config, mode, common)
    finally:
        os.unlink(recipe)


def _run(config: QADConfig, mode: str, common: dict) -> dict:
    if mode != "eval" and check_teacher_checkpoint(config):
        teacher = run_pretrain(recipe_to_argv(config, mode="teacher", **common), recipe_keys=True)
        if "stopped_at" in teacher:  # stopped by a signal or the clock before the teacher was complete
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"the teacher's training stopped at iteration {teacher['stopped_at']} of "
                      f"{config.teacher.pretrain_iters}; {config.teacher.checkpoint} is marked unfinished: the "
                      f"same command resumes its training, and no run distils from it before", flush=True)
            return teacher
    argv = recipe_to_argv(config, **common)
    if mode == "ptq":
        argv = _without_load(argv) + ["--skip-train"]
        if config.checkpoint.save:
            argv += ["--qad-save-student", str(Path(config.checkpoint.save) / "ptq")]
    elif mode == "eval":
        student = student_checkpoint(config.checkpoint.save)
        argv = _without_load(argv) + ["--skip-train", "--qad-student-load", str(student),
                                      "--qad-eval-report", str(Path(config.checkpoint.save) / "eval.json")]
    return run_pretrain(argv + ["--qad-command", mode], recipe_keys=True)
