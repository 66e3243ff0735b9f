"""The on-disk conventions of the export (``export.format``), one module each: ``modelopt``
(ModelOpt / TensorRT-LLM) and ``compressed_tensors`` (compressed-tensors' nvfp4-pack-quantized)."""

from ...config import ConfigError
from . import compressed_tensors, modelopt
from .base import ExportFormat, NVFP4Linear, Quantization

FORMATS: dict[str, ExportFormat] = {"modelopt": modelopt.FORMAT, "compressed_tensors": compressed_tensors.FORMAT}


def get_format(name: str) -> ExportFormat:
    """The format registered as ``name``; ConfigError naming ``export.format`` otherwise."""
    if name not in FORMATS:
        raise ConfigError(f"'export.format' is {name!r}; use one of {sorted(FORMATS)}")
    return FORMATS[name]


__all__ = ["FORMATS", "ExportFormat", "NVFP4Linear", "Quantization", "get_format"]
