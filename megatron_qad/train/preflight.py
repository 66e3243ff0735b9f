"""Checks a recipe gets before any process group or model exists, so that a run fails in its
first second with a one-line :class:`~megatron_qad.config.ConfigError` naming the recipe key,
instead of after a teacher was trained or a model loaded.

- :func:`check_runnable`: settings the device cannot run, data sources, a ``checkpoint.save`` that
  cannot be a directory;
- :func:`check_teacher_checkpoint`: ``teacher.checkpoint`` is a complete checkpoint (a Megatron-LM
  checkpoint directory or a bare dist checkpoint), or a path that does not exist yet where
  ``teacher.pretrain_iters`` > 0 trains one;
- :func:`check_output_dir`: a directory the run will write (``export.dir``, ``checkpoint.save``,
  ``import --out``) can be created.
"""

import importlib.metadata
from pathlib import Path

import torch

from .. import quantize
from ..checkpoint_tracker import MEGATRON_LATEST
from ..config import ConfigError, QADConfig
from ..data import validate_sources
from . import teacher_state
from .checkpoint_checks import check_checkpoint_files
from .checkpointing import has_checkpoint, resolve_checkpoint


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """The GPU's compute capability (major, minor); None on the CPU."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` (a pip package name), None when it is missing."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def nvfp4_backend(quantization, model_cfg, device: torch.device) -> str:
    """The backend ("emulated" or "te") that runs the student's NVFP4 GEMMs on ``device``
    (``quantization.backend`` resolved; ConfigError where "te" cannot run)."""
    return quantize.backend.select_backend(quantization.backend, device_capability(device),
                                           installed_version("transformer_engine"),
                                           te_spec_model=model_cfg.transformer_impl == "transformer_engine")


def check_runnable(config: QADConfig, device: torch.device) -> None:
    """Errors a run would otherwise hit late, named by key."""
    if config.checkpoint.save:
        check_output_dir(config.checkpoint.save, "checkpoint.save")
    if device.type == "cpu" and config.model.params_dtype != "float32":
        raise ConfigError("training on the CPU needs 'model.params_dtype: float32' (megatron.core's BF16 "
                          "mixed-precision optimizer runs on GPUs only); set model.params_dtype=float32")
    if device.type == "cpu" and config.training.use_distributed_optimizer:
        raise ConfigError("'training.use_distributed_optimizer: true' needs GPUs (megatron.core's distributed "
                          "optimizer accepts CUDA parameters only); set it to null or false on the CPU")
    nvfp4_backend(config.quantization, config.model, device)
    if config.teacher.checkpoint is None:
        raise ConfigError("'teacher.checkpoint' is not set: give the BF16 teacher's Megatron-LM or megatron.core "
                          "checkpoint (or a directory to train a small one in, with teacher.pretrain_iters)")
    try:
        validate_sources(config.data.sources, config.model.vocab_size)
        if config.data.validation_sources:
            validate_sources(config.data.validation_sources, config.model.vocab_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_teacher_checkpoint(config: QADConfig) -> bool:
    """Check ``teacher.checkpoint`` as :class:`~megatron_qad.config.TeacherConfig` documents it;
    return True when a teacher is to be trained there first (``teacher.pretrain_iters`` > 0 and
    the path does not exist, or holds a teacher whose training stopped before its last iteration:
    :mod:`.teacher_state`), False when one is to be loaded from there.

    Raises ConfigError when the key is null; when the path exists but is not a complete dist
    checkpoint (an empty directory, e.g. a copy that failed, or one without ``metadata.json``:
    nothing is trained into an existing directory); when a file of the checkpoint is missing or
    cut short (:func:`~.checkpoint_checks.check_checkpoint_files`); when the path does not exist
    and ``teacher.pretrain_iters`` is 0; and when a regular file stands where its directory
    would be created. Whether the checkpoint's tensors fit the recipe's model is checked when it
    is loaded (``checkpointing.load_model``). Call it on every rank; it only reads."""
    teacher = config.teacher
    if teacher.checkpoint is None:
        raise ConfigError("'teacher.checkpoint' is not set: give the BF16 teacher's Megatron-LM or megatron.core "
                          "checkpoint (or a directory to train a small one in, with teacher.pretrain_iters)")
    path = Path(teacher.checkpoint).expanduser()
    if path.is_dir():
        if teacher_state.unfinished(path) is not None:  # a teacher whose training stopped: it resumes
            return True
        if not has_checkpoint(path):
            contents = "is empty" if not any(path.iterdir()) else f"holds neither {MEGATRON_LATEST} nor metadata.json"
            raise ConfigError(f"'teacher.checkpoint' ({path}) {contents}: it is not a checkpoint. Point it at "
                              f"one, or remove the directory to have teacher.pretrain_iters train a teacher there "
                              f"(nothing is trained into an existing directory)")
        check_checkpoint_files(resolve_checkpoint(path))
        return False
    if path.exists():
        raise ConfigError(f"'teacher.checkpoint' ({path}) is a file, not a dist checkpoint directory; point it "
                          f"at the directory of a megatron.core dist checkpoint")
    if teacher.pretrain_iters == 0:
        raise ConfigError(f"'teacher.checkpoint' ({path}) does not exist; point it at the teacher's dist "
                          f"checkpoint, or set teacher.pretrain_iters > 0 to train a small teacher there")
    check_output_dir(path, "teacher.checkpoint")
    return True


def check_output_dir(path: str | Path, key: str) -> None:
    """Raise ConfigError naming recipe key ``key`` unless directory ``path`` exists or can be
    created: ``path`` itself and every existing parent must be directories (a regular file on the
    way makes ``mkdir`` fail only after the model was loaded). Returns None."""
    path = Path(path).expanduser()
    for place in (path, *path.parents):
        if place.exists():
            if not place.is_dir():
                where = "is" if place == path else f"lies under {place}, which is"
                raise ConfigError(f"'{key}' ({path}) {where} a regular file, not a directory; "
                                  f"choose another {key}")
            return
