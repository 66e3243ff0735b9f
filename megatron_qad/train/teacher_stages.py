"""A teacher trained here in stages: pre-training on general data, post-training on a task, and
optionally rejection-sampling fine-tuning (RFT) beyond the post-training data.

    prepare_teacher(config)   # before run(config, ...) when teacher.posttrain_iters > 0

Published QAD results concern models whose last training stages (SFT, RL) changed what they do;
QAT on the SFT data pulls them back toward it, QAD keeps what they became. This module makes such a
teacher at toy size with the run's own machinery (:func:`megatron_qad.train.run`), in steps that
each skip when their output exists (so an interrupted preparation continues):

1. pre-training: ``teacher.pretrain_iters`` steps of cross entropy on ``data.sources`` from scratch,
   saved at ``CHECKPOINT.stages/pretrain`` (the run's own teacher pre-training, triggered by a
   ``ptq`` run with nothing quantized);
2. post-training (SFT): a ``train`` run with cross entropy on ``teacher.posttrain_sources``,
   starting from stage 1, nothing quantized (empty policy, BF16 K/V), ``teacher.posttrain_iters``
   steps at LR ``teacher.posttrain_lr`` cosine to 0, in ``CHECKPOINT.stages/posttrain``;
3. when ``teacher.rft_iters`` > 0: the stage-2 model is copied to ``CHECKPOINT.stages/sft`` (a
   model checkpoint) and a ``train`` run like stage 2 continues it on ``teacher.rft_sources`` for
   ``teacher.rft_iters`` steps at ``teacher.rft_lr``, with the stage-2 model as the run's teacher:
   its ``teacher_answers`` sources sample from it (``keep: correct`` keeps its correct answers,
   cached in ``CHECKPOINT.stages/rft``), in ``CHECKPOINT.stages/rft``;
4. the last stage's model is copied to ``teacher.checkpoint`` as a model-only dist checkpoint.

Every rank of the job calls :func:`prepare_teacher`, outside any :func:`run`.
"""

import copy
from pathlib import Path

from .. import parallel
from ..checkpoint_tracker import saved_iteration
from ..config import ConfigError, QADConfig, QuantizationConfig
from ..data import validate_sources
from ..models import build_model_chunks
from . import checkpointing, teacher_state
from .run import run

NOTHING_QUANTIZED = QuantizationConfig(policy=None, format=None, rules=[], kv_cache="bf16")
"""A student quantization that quantizes nothing: stages 1 and 2 train plain models."""


def stage_dirs(config: QADConfig) -> tuple[Path, Path]:
    """``(pretrained teacher checkpoint, post-training run directory)`` of the recipe's teacher."""
    stages = Path(f"{config.teacher.checkpoint}.stages")
    return stages / "pretrain", stages / "posttrain"


def rft_dirs(config: QADConfig) -> tuple[Path, Path]:
    """``(post-trained (SFT) model checkpoint, RFT run directory)`` of the recipe's teacher."""
    stages = Path(f"{config.teacher.checkpoint}.stages")
    return stages / "sft", stages / "rft"


def plain_ce_run(config: QADConfig, teacher_dir: Path, save: str | None) -> QADConfig:
    """A copy of ``config`` training a plain model with cross entropy from ``teacher_dir`` (no
    quantization, no calibration, no post-training of its own), checkpoints in ``save``."""
    stage = copy.deepcopy(config)
    stage.quantization = copy.deepcopy(NOTHING_QUANTIZED)
    stage.distill.loss = "ce"
    stage.distill.calibration_iters = 0
    stage.teacher.checkpoint = str(teacher_dir)
    stage.teacher.posttrain_iters = stage.teacher.rft_iters = 0
    stage.checkpoint.save = save
    return stage


def pretrain_config(config: QADConfig) -> QADConfig:
    """Stage 1: a ``ptq`` run of this config makes the run pre-train the teacher into its directory."""
    pretrain_dir, _ = stage_dirs(config)
    return plain_ce_run(config, pretrain_dir, save=None)


def posttrain_config(config: QADConfig) -> QADConfig:
    """Stage 2: a ``train`` run of this config post-trains the stage-1 model."""
    pretrain_dir, posttrain_dir = stage_dirs(config)
    teacher = config.teacher
    return continued_training(config, pretrain_dir, posttrain_dir, teacher.posttrain_sources,
                              teacher.posttrain_iters, teacher.posttrain_lr)


def rft_config(config: QADConfig) -> QADConfig:
    """Stage 3: a ``train`` run of this config continues the post-trained model on ``teacher.rft_sources``,
    sampling from it."""
    sft_dir, rft_dir = rft_dirs(config)
    teacher = config.teacher
    return continued_training(config, sft_dir, rft_dir, teacher.rft_sources, teacher.rft_iters, teacher.rft_lr)


def continued_training(config: QADConfig, start: Path, save: Path, sources: list, iters: int,
                       lr: float) -> QADConfig:
    """A ``train`` run of a plain model from ``start`` with cross entropy on ``sources`` for ``iters``
    steps at LR ``lr`` cosine to 0, checkpointed only at its end in ``save`` (generated data cached there)."""
    stage = plain_ce_run(config, start, save=str(save))
    stage.data.sources = copy.deepcopy(sources)
    stage.data.validation_sources = None
    stage.data.cache_dir = None
    stage.training.train_iters = iters
    stage.training.lr = lr
    stage.training.min_lr = 0.0
    stage.training.lr_decay_iters = None
    stage.training.lr_decay_style = "cosine"
    stage.training.eval_interval = None
    stage.training.exit_interval = None
    stage.checkpoint.save_interval = None
    return stage


def check_stage_sources(config: QADConfig) -> None:
    """ConfigError naming ``teacher.posttrain_sources`` / ``teacher.rft_sources`` when they are not
    valid data sources."""
    stages = [("posttrain_sources", config.teacher.posttrain_sources)]
    if config.teacher.rft_iters:
        stages.append(("rft_sources", config.teacher.rft_sources))
    for key, sources in stages:
        try:
            validate_sources(sources, config.model.vocab_size)
        except ValueError as err:
            raise ConfigError(str(err).replace("data.sources", f"teacher.{key}")) from None


def copy_model(config: QADConfig, source: Path, destination: str | Path) -> None:
    """Load the model checkpoint (or a training checkpoint's model) at ``source`` into plain chunks
    of ``config``'s model and layout, and save them as a model checkpoint at ``destination``."""
    context = parallel.initialize(config.parallel, seed=config.model.seed)
    try:
        chunks = build_model_chunks(config.model, config.parallel, context.device)
        checkpointing.load_model(chunks, source)
        checkpointing.save_model(chunks, destination)
    finally:
        parallel.destroy()


def _stopped(summary: dict) -> dict | None:
    """``summary`` of a stage's run when it stopped before its end (a signal, the clock), else None."""
    return summary if "stopped_at" in summary else None


def prepare_teacher(config: QADConfig) -> dict | None:
    """Train the recipe's staged teacher into ``teacher.checkpoint`` (see the module docstring);
    nothing to do when ``teacher.posttrain_iters`` is 0 or the checkpoint exists. A stage that
    stopped before its last iteration ends the preparation: its summary is returned (else None),
    and the next call resumes that stage; no later stage starts from a half-trained model."""
    teacher = config.teacher
    if not teacher.posttrain_iters or teacher.checkpoint is None or checkpointing.has_checkpoint(teacher.checkpoint):
        return None
    check_stage_sources(config)
    pretrain_dir, posttrain_dir = stage_dirs(config)
    if not checkpointing.has_checkpoint(pretrain_dir) or teacher_state.unfinished(pretrain_dir):
        if stopped := _stopped(run(pretrain_config(config), "ptq")):
            return stopped
    if (saved_iteration(posttrain_dir) or 0) < teacher.posttrain_iters:
        if stopped := _stopped(run(posttrain_config(config), "train")):
            return stopped
    last = checkpointing.student_checkpoint(posttrain_dir)
    if teacher.rft_iters:
        sft_dir, rft_dir = rft_dirs(config)
        if not checkpointing.has_checkpoint(sft_dir):
            copy_model(config, last, sft_dir)
        if (saved_iteration(rft_dir) or 0) < teacher.rft_iters:
            if stopped := _stopped(run(rft_config(config), "train")):
                return stopped
        last = checkpointing.student_checkpoint(rft_dir)
    copy_model(config, last, teacher.checkpoint)
    return None
