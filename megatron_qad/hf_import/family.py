"""Architecture families and the registry that picks one for a ``config.json``.

A :class:`Family` says how the ``config.json`` of its architectures becomes the architecture fields
of a recipe's ``model:`` section (:class:`~megatron_qad.config.ModelConfig` field -> value), refusing
(ConfigError naming the field and its value) whatever megatron.core cannot reproduce, and which
Hugging Face tensors fill which Megatron tensors (by default the export's name table read
backwards, :func:`megatron_qad.export.hf_names.hf_sources`).
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError, ModelConfig
from ..export.hf_names import Piece, hf_sources

_REQUIRED = object()


class HFConfig:
    """``config.json`` values, read so that every error names the field (``source``: the file)."""

    def __init__(self, data: dict, source: str):
        self.data = data
        self.source = source

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        """``config.json``'s ``key`` (``default`` when absent or null; ConfigError when absent and required)."""
        value = self.data.get(key)
        if value is None:
            if default is _REQUIRED:
                raise ConfigError(f"{self.source}: field '{key}' is missing; this importer needs it")
            return default
        return value

    def int(self, key: str, default: Any = _REQUIRED) -> int:
        """An integer field (a float with an integer value is accepted, e.g. rope_theta 1000000.0)."""
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
            raise ConfigError(f"{self.source}: field '{key}' is {value!r}; expected an integer")
        return int(value)

    def refuse(self, key: str, value: Any, why: str) -> ConfigError:
        """The error for a field whose value the import cannot reproduce: ``why`` says what is supported."""
        return ConfigError(f"{self.source}: field '{key}' is {value!r}, which megatron_qad cannot reproduce: {why}")

    def expect(self, key: str, allowed: Iterable, default: Any, why: str) -> Any:
        """The field's value (``default`` when absent), refused unless it is one of ``allowed``."""
        value = self.get(key, default)
        if value not in list(allowed):
            raise self.refuse(key, value, why)
        return value

    def rope(self) -> tuple[float, dict | None]:
        """(rope theta, the scaling parameters or None) from transformers 5's ``rope_parameters``
        or the older ``rope_theta`` + ``rope_scaling`` (published checkpoints); the key to name in
        errors is :attr:`rope_key`."""
        parameters = self.data.get("rope_parameters")
        if isinstance(parameters, dict):
            theta = parameters.get("rope_theta", self.data.get("rope_theta", 10000.0))
            scaling = {key: value for key, value in parameters.items() if key != "rope_theta"}
        else:
            theta = self.get("rope_theta", 10000.0)
            scaling = dict(self.data.get("rope_scaling") or {})
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        return float(theta), (None if kind == "default" else {**scaling, "rope_type": kind})

    @property
    def rope_key(self) -> str:
        """The field holding the RoPE scaling: ``rope_parameters`` or ``rope_scaling``."""
        return "rope_parameters" if isinstance(self.data.get("rope_parameters"), dict) else "rope_scaling"


TensorSources = Callable[[ModelConfig, Iterable[str]], dict[str, list[tuple[str, Piece]]]]
"""(model config, the Megatron model's state-dict names) -> {Megatron name: [(HF tensor name, the
rows of the Megatron tensor it fills)]}; a name without an entry is an error (``_extra_state``
entries are not asked for)."""


@dataclass(frozen=True)
class Family:
    """One architecture family of the registry.

    ``architectures``: the ``config.json`` ``architectures[0]`` values it reads; ``model_types``:
    the ``model_type`` values it reads when ``architectures`` names no family. ``model_fields(config)``:
    the recipe's architecture fields (ModelConfig field -> value) of an :class:`HFConfig`, raising
    ConfigError for what cannot be reproduced. ``ignored_tensors``: regular expressions of HF
    tensor names that change nothing in the model's function and have no Megatron counterpart (e.g.
    stored rotary frequencies). ``tensor_sources``: see :data:`TensorSources`."""

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    model_fields: Callable[[HFConfig], dict]
    ignored_tensors: tuple[str, ...] = ()
    tensor_sources: TensorSources = hf_sources


FAMILIES: list[Family] = []
"""The registered families, in registration order."""


def register(family: Family) -> Family:
    """Add ``family`` to the registry (an architecture or model_type already taken: ValueError)."""
    for other in FAMILIES:
        taken = set(other.architectures) & set(family.architectures) or set(other.model_types) & set(family.model_types)
        if taken:
            raise ValueError(f"family {family.name!r}: {sorted(taken)} already belong to family {other.name!r}")
    FAMILIES.append(family)
    return family


def family_for(config: HFConfig) -> Family:
    """The family of ``config.json``'s ``architectures[0]``, else of its ``model_type``; ConfigError
    naming both when no family reads them."""
    architectures = config.get("architectures", [])
    architecture = architectures[0] if isinstance(architectures, list) and architectures else None
    model_type = config.get("model_type", None)
    for family in FAMILIES:
        if architecture in family.architectures:
            return family
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = sorted(name for family in FAMILIES for name in family.architectures)
    raise ConfigError(f"{config.source}: field 'architectures' is {architectures!r} (model_type {model_type!r}), "
                      f"which megatron_qad cannot import; supported architectures: {', '.join(known)}")
