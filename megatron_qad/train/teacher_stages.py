"""A two-stage teacher trained here: pre-training on general data, then post-training on a task.

    prepare_teacher(config)   # before run(config, ...) when teacher.posttrain_iters > 0

Published QAD results concern models whose last training stage (SFT, RL) changed what they do;
QAT on generic data forgets that stage, QAD keeps it. This module makes such a teacher at toy size
with the run's own machinery (:func:`megatron_qad.train.run`), in three steps that each skip when
their output exists (so an interrupted preparation continues):

1. pre-training: ``teacher.pretrain_iters`` steps of cross entropy on ``data.sources`` from scratch,
   saved at ``CHECKPOINT.stages/pretrain`` (the run's own teacher pre-training, triggered by a
   ``ptq`` run with nothing quantized);
2. post-training: a ``train`` run with cross entropy on ``teacher.posttrain_sources``, starting from
   stage 1, nothing quantized (empty policy, BF16 K/V), ``teacher.posttrain_iters`` steps at LR
   ``teacher.posttrain_lr`` cosine to 0, in ``CHECKPOINT.stages/posttrain``;
3. the post-trained model is copied to ``teacher.checkpoint`` as a model-only dist checkpoint.

Every rank of the job calls :func:`prepare_teacher`, outside any :func:`run`.
"""

import copy
from pathlib import Path

from .. import parallel
from ..checkpoint_tracker import has_tracker
from ..config import ConfigError, QADConfig, QuantizationConfig
from ..data import validate_sources
from ..models import build_model_chunks
from . import checkpointing
from .run import run

NOTHING_QUANTIZED = QuantizationConfig(policy=None, format=None, rules=[], kv_cache="bf16")
"""A student quantization that quantizes nothing: stages 1 and 2 train plain models."""


def stage_dirs(config: QADConfig) -> tuple[Path, Path]:
    """``(pretrained teacher checkpoint, post-training run directory)`` of the recipe's teacher."""
    stages = Path(f"{config.teacher.checkpoint}.stages")
    return stages / "pretrain", stages / "posttrain"


def plain_ce_run(config: QADConfig, teacher_dir: Path, save: str | None) -> QADConfig:
    """A copy of ``config`` training a plain model with cross entropy from ``teacher_dir`` (no
    quantization, no calibration, no post-training of its own), checkpoints in ``save``."""
    stage = copy.deepcopy(config)
    stage.quantization = copy.deepcopy(NOTHING_QUANTIZED)
    stage.distill.loss = "ce"
    stage.distill.calibration_iters = 0
    stage.teacher.checkpoint = str(teacher_dir)
    stage.teacher.posttrain_iters = 0
    stage.checkpoint.save = save
    return stage


def pretrain_config(config: QADConfig) -> QADConfig:
    """Stage 1: a ``ptq`` run of this config makes the run pre-train the teacher into its directory."""
    pretrain_dir, _ = stage_dirs(config)
    return plain_ce_run(config, pretrain_dir, save=None)


def posttrain_config(config: QADConfig) -> QADConfig:
    """Stage 2: a ``train`` run of this config post-trains the stage-1 model."""
    pretrain_dir, posttrain_dir = stage_dirs(config)
    stage = plain_ce_run(config, pretrain_dir, save=str(posttrain_dir))
    teacher = config.teacher
    stage.data.sources = copy.deepcopy(teacher.posttrain_sources)
    stage.data.validation_sources = None
    stage.training.train_iters = teacher.posttrain_iters
    stage.training.lr = teacher.posttrain_lr
    stage.training.min_lr = 0.0
    stage.training.lr_decay_iters = None
    stage.training.lr_decay_style = "cosine"
    stage.training.eval_interval = None
    stage.training.exit_interval = None
    stage.checkpoint.save_interval = None
    return stage


def check_posttrain_sources(config: QADConfig) -> None:
    """ConfigError naming ``teacher.posttrain_sources`` when they are not valid data sources."""
    try:
        validate_sources(config.teacher.posttrain_sources, config.model.vocab_size)
    except ValueError as err:
        raise ConfigError(str(err).replace("data.sources", "teacher.posttrain_sources")) from None


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


def prepare_teacher(config: QADConfig) -> None:
    """Train the recipe's two-stage teacher into ``teacher.checkpoint`` (see the module docstring);
    nothing to do when ``teacher.posttrain_iters`` is 0 or the checkpoint exists."""
    teacher = config.teacher
    if not teacher.posttrain_iters or teacher.checkpoint is None or checkpointing.has_checkpoint(teacher.checkpoint):
        return
    check_posttrain_sources(config)
    pretrain_dir, posttrain_dir = stage_dirs(config)
    if not checkpointing.has_checkpoint(pretrain_dir):
        run(pretrain_config(config), "ptq")
    if not has_tracker(posttrain_dir):
        run(posttrain_config(config), "train")
    copy_model(config, checkpointing.student_checkpoint(posttrain_dir), teacher.checkpoint)
