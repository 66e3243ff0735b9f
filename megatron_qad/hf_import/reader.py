"""A Hugging Face checkpoint directory, read lazily: ``config.json`` and the names, dtypes and shapes
of its safetensors tensors (from the file headers), then one file's tensors at a time.

Layouts: a single ``model.safetensors``, or shards listed by ``model.safetensors.index.json``
(``weight_map``: tensor name -> file name), the two that ``save_pretrained`` writes. Tensors must be
bfloat16, float16 or float32. Every problem is a :class:`ConfigError` naming the file.
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import ConfigError

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
"""safetensors dtype names of the tensors an import accepts, and their torch dtypes."""


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor: the file (name within the checkpoint) that holds it, its dtype and shape."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class HFCheckpoint:
    """A checkpoint directory: ``config`` (config.json as a dict) and ``tensors`` (name -> TensorInfo)."""

    directory: Path
    config: dict
    tensors: dict[str, TensorInfo]

    @property
    def files(self) -> list[str]:
        """The safetensors files, in name order (shard order)."""
        return sorted({info.file for info in self.tensors.values()})

    def read(self, file: str) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of every tensor of ``file``, one at a time, each read from the file only
        when it is reached (the file is memory-mapped while the iterator runs)."""
        with safe_open(self.directory / file, framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def open_checkpoint(directory: str | Path) -> HFCheckpoint:
    """Read ``config.json`` and the safetensors headers of the checkpoint at ``directory``.

    Raises ConfigError for a missing directory, config.json or weights file, an index naming a
    missing file or a tensor twice, and a tensor whose dtype is not bf16 / fp16 / fp32."""
    directory = Path(directory)
    config_path = directory / CONFIG
    if not config_path.is_file():
        raise ConfigError(f"'{config_path}' not found; pass the directory of a Hugging Face checkpoint "
                          f"(with config.json and model.safetensors)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"cannot parse '{config_path}' as JSON: {err}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"'{config_path}' must hold a JSON object, got a {type(config).__name__}")
    tensors = {}
    for file in _weight_files(directory):
        tensors.update(_headers(directory, file, tensors))
    return HFCheckpoint(directory, config, tensors)


def _weight_files(directory: Path) -> list[str]:
    """The safetensors files of ``directory``: the index's, else the single file."""
    index = directory / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"'{index}' is not a safetensors index (a JSON object with a 'weight_map' "
                              f"of tensor name -> file name)") from None
        files = sorted(set(weight_map.values()))
        missing = [file for file in files if not (directory / file).is_file()]
        if missing:
            raise ConfigError(f"'{index}' lists {missing[:3]}, which are not in '{directory}'; "
                              f"download the whole checkpoint")
        return files
    if (directory / SINGLE).is_file():
        return [SINGLE]
    found = sorted(path.name for path in directory.glob("*.bin")) or sorted(path.name for path in directory.iterdir())
    raise ConfigError(f"'{directory}' has neither {SINGLE} nor {INDEX} (it holds {found[:5]}); import reads "
                      f"safetensors checkpoints: convert .bin weights with save_pretrained(safe_serialization=True)")


def _headers(directory: Path, file: str, seen: dict) -> dict[str, TensorInfo]:
    """TensorInfo of every tensor in ``file`` (read from its header only)."""
    infos = {}
    with safe_open(directory / file, framework="pt") as handle:
        for name in handle.keys():
            if name in seen:
                raise ConfigError(f"tensor '{name}' is stored twice, in '{seen[name].file}' and '{file}' "
                                  f"of '{directory}'; the checkpoint is inconsistent")
            piece = handle.get_slice(name)
            dtype = piece.get_dtype()
            if dtype not in DTYPES:
                raise ConfigError(f"tensor '{name}' in '{directory / file}' is {dtype}; import reads "
                                  f"{', '.join(DTYPES)} checkpoints (quantized checkpoints are not BF16 teachers)")
            infos[name] = TensorInfo(file, DTYPES[dtype], tuple(piece.get_shape()))
    return infos
