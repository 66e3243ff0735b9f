"""Checks a recipe gets before any process group or model exists: errors named by key."""

import importlib.metadata

import torch

from .. import quantize
from ..config import ConfigError, QADConfig
from ..data import validate_sources


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """The GPU's compute capability (major, minor); None on the CPU."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` (a pip package name), None when it is missing."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_runnable(config: QADConfig, device: torch.device) -> None:
    """Errors a run would otherwise hit late, named by key."""
    if device.type == "cpu" and config.model.params_dtype != "float32":
        raise ConfigError("training on the CPU needs 'model.params_dtype: float32' (megatron.core's BF16 "
                          "mixed-precision optimizer runs on GPUs only); set model.params_dtype=float32")
    if device.type == "cpu" and config.training.use_distributed_optimizer:
        raise ConfigError("'training.use_distributed_optimizer: true' needs GPUs (megatron.core's distributed "
                          "optimizer accepts CUDA parameters only); set it to null or false on the CPU")
    quantize.backend.select_backend(config.quantization.backend, device_capability(device),
                                    installed_version("transformer_engine"),
                                    te_spec_model=config.model.transformer_impl == "transformer_engine")
    if config.teacher.checkpoint is None:
        raise ConfigError("'teacher.checkpoint' is not set: give the BF16 teacher's Megatron-LM or megatron.core "
                          "checkpoint (or a directory to train a small one in, with teacher.pretrain_iters)")
    try:
        validate_sources(config.data.sources, config.model.vocab_size)
        if config.data.validation_sources:
            validate_sources(config.data.validation_sources, config.model.vocab_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
