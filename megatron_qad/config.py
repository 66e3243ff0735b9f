"""Typed run configuration: dataclasses loaded strictly from a YAML recipe plus ``key=value`` overrides.

A recipe is a mapping of sections (``model``, ``parallel``, ...), each a mapping of keys to values:

    model:
      num_layers: 4
      hidden_size: 128
    parallel:
      tensor_model_parallel_size: 1

Every key must be a field of the section's dataclass and every value must have the field's type;
anything else raises :class:`ConfigError` naming the key path (``model.hidden_size``) and the fix.
Adding a section is adding a dataclass and a field of :class:`QADConfig`; the loader needs no change.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

NVFP4_BLOCK_SIZE = 16
"""NVFP4 quantizes blocks of 16 elements along the GEMM reduction (K) dimension."""


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the key path and how to fix it."""


@dataclass
class ModelConfig:
    """Architecture of a Megatron GPT model (dense or mixture-of-experts).

    Sizes are element counts; ``seq_length`` is in tokens. ``num_moe_experts = 0`` builds dense
    MLPs; otherwise every layer's MLP is a MoE layer with ``num_moe_experts`` experts of width
    ``moe_ffn_hidden_size`` (None: same as ``ffn_hidden_size``), top-``moe_router_topk`` routing,
    and a shared expert of width ``moe_shared_expert_intermediate_size`` (0: none).
    ``moe_grouped_gemm`` asks for Transformer Engine's grouped-GEMM experts (TEGroupedMLP), which
    the local spec cannot build (build_gpt_model raises ConfigError); false gives a SequentialMLP
    of per-expert linear layers. The ``alltoall`` dispatcher needs a GPU.
    ``activation``: "swiglu" is a gated SiLU MLP (fc1 has 2 x ffn outputs). ``params_dtype`` is
    the dtype of the parameters; ``seed`` fixes their initialisation (normal, std
    ``init_method_std``).
    """

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    seq_length: int
    num_moe_experts: int = 0
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None
    moe_shared_expert_intermediate_size: int = 0
    moe_grouped_gemm: bool = False
    moe_token_dispatcher_type: Literal["allgather", "alltoall"] = "allgather"
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    activation: Literal["swiglu", "gelu", "squared_relu"] = "swiglu"
    position_embedding_type: Literal["rope", "learned_absolute"] = "rope"
    rotary_base: int = 10000
    add_bias_linear: bool = False
    share_embeddings_and_output_weights: bool = False
    init_method_std: float = 0.02
    params_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    seed: int = 1234

    @property
    def is_moe(self) -> bool:
        """True when the MLPs are mixture-of-experts layers."""
        return self.num_moe_experts > 0

    @property
    def expert_ffn_hidden_size(self) -> int:
        """Width of one routed expert's MLP."""
        return self.ffn_hidden_size if self.moe_ffn_hidden_size is None else self.moe_ffn_hidden_size


@dataclass
class ParallelConfig:
    """Process layout. World size = TP x PP x CP x data-parallel size; experts are split EP ways.

    ``sequence_parallel`` applies when ``tensor_model_parallel_size > 1`` (Megatron requires it
    for MoE layers under tensor parallelism).
    """

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = True


@dataclass
class QADConfig:
    """A whole run: one field per recipe section."""

    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> QADConfig:
    """Read a YAML recipe, apply ``section.key=value`` overrides, and validate the result.

    Override values are parsed with the type of the field they set (``model.hidden_size=128`` is an
    int, ``model.moe_grouped_gemm=true`` a bool, ``model.moe_ffn_hidden_size=null`` None).
    Raises :class:`ConfigError` for a missing or unparsable file, unknown keys, wrong types,
    missing required keys, and inconsistent sizes.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found; pass the path of a YAML recipe, "
                          f"e.g. configs/tiny_cpu.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse '{path}' as YAML: {err}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"'{path}' must hold a mapping of sections (model:, parallel:, ...), "
                          f"got a {type(data).__name__}")
    for override in overrides:
        _apply_override(data, override)
    config = _build(QADConfig, data, prefix="", source=str(path))
    validate(config)
    return config


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain nested dicts (YAML-serialisable)."""
    return dataclasses.asdict(config)


# ---------------------------------------------------------------------------------------------
# Strict construction of nested dataclasses from plain data.


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _unknown_key_error(key_path: str, name: str, valid: list[str], prefix: str) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=1)
    if close:
        return ConfigError(f"unknown key '{key_path}'; did you mean '{_key(prefix, close[0])}'?")
    where = f"'{prefix}'" if prefix else "the top level"
    return ConfigError(f"unknown key '{key_path}'; valid keys in {where}: {', '.join(valid)}")


def _build(cls: type, data: Any, prefix: str, source: str):
    """Instantiate dataclass ``cls`` from mapping ``data``; ``prefix`` is its key path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix}' must be a mapping of keys to values, "
                          f"got {data!r} ({type(data).__name__})")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in fields:
            raise _unknown_key_error(_key(prefix, str(name)), str(name), sorted(fields), prefix)
    kwargs = {}
    for name, f in fields.items():
        key_path = _key(prefix, name)
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], key_path, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = _build(hints[name], {}, key_path, source)
            else:
                section = f"the '{prefix}' section" if prefix else "the top level"
                raise ConfigError(f"{source}: missing key '{key_path}' ({_describe(hints[name])}); "
                                  f"add it to {section}")
    return cls(**kwargs)


def _describe(tp: Any) -> str:
    """A short human name of a field type, for error messages."""
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if _is_optional(tp):
        return _describe(_strip_optional(tp)) + " or null"
    return str(tp)


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _strip_optional(tp: Any) -> Any:
    (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
    return inner


def _coerce(value: Any, tp: Any, key_path: str, source: str) -> Any:
    """Check ``value`` against field type ``tp``; ints are accepted for floats, nothing else converts."""
    if dataclasses.is_dataclass(tp):  # an empty section ("parallel:" alone) reads as None
        return _build(tp, {} if value is None else value, key_path, source)
    if _is_optional(tp):
        return None if value is None else _coerce(value, _strip_optional(tp), key_path, source)
    if typing.get_origin(tp) is Literal:
        ok = isinstance(value, str) and value in typing.get_args(tp)
    elif tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise ConfigError(f"{source}: '{key_path}' must be {_describe(tp)}, "
                          f"got {value!r} ({type(value).__name__})")
    return value


# ---------------------------------------------------------------------------------------------
# Overrides: section.key=value, parsed with the type of the field they set.

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _apply_override(data: dict, override: str) -> None:
    """Set one ``a.b=value`` override into the raw recipe mapping ``data`` (in place)."""
    key_path, sep, text = override.partition("=")
    key_path = key_path.strip()
    if not sep or not key_path:
        raise ConfigError(f"override '{override}' must look like section.key=value, "
                          f"e.g. model.hidden_size=128")
    cls, target, prefix = QADConfig, data, ""
    names = key_path.split(".")
    for depth, name in enumerate(names):
        fields = {f.name for f in dataclasses.fields(cls)}
        if name not in fields:
            raise _unknown_key_error(_key(prefix, name), name, sorted(fields), prefix)
        tp = typing.get_type_hints(cls)[name]
        prefix = _key(prefix, name)
        if depth == len(names) - 1:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"override '{override}': '{prefix}' is a section; set one of its "
                                  f"keys, e.g. {prefix}.{dataclasses.fields(tp)[0].name}=...")
            target[name] = _parse_text(text.strip(), tp, f"override '{override}'", prefix)
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"override '{override}': '{prefix}' is a value, not a section; "
                              f"use {prefix}=...")
        if target.get(name) is None:
            target[name] = {}
        section = target[name]
        if not isinstance(section, dict):
            raise ConfigError(f"'{prefix}' must be a mapping of keys to values, got {section!r}")
        cls, target = tp, section


def _parse_text(text: str, tp: Any, source: str, key_path: str) -> Any:
    """Parse override text as field type ``tp``."""
    if _is_optional(tp):
        if text.lower() in ("null", "none", "~"):
            return None
        return _parse_text(text, _strip_optional(tp), source, key_path)
    try:
        if tp is bool:
            if text.lower() in _TRUE | _FALSE:
                return text.lower() in _TRUE
            raise ValueError
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
    except ValueError:
        raise ConfigError(f"{source}: '{key_path}' must be {_describe(tp)}, got '{text}'") from None
    if typing.get_origin(tp) is Literal and text not in typing.get_args(tp):
        raise ConfigError(f"{source}: '{key_path}' must be {_describe(tp)}, got '{text}'")
    return text


# ---------------------------------------------------------------------------------------------
# Consistency checks between sizes.


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_at_least(section: str, obj: Any, names: tuple[str, ...], minimum: int = 1) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(value >= minimum, f"'{section}.{name}' must be >= {minimum}, got {value}")


def validate(config: QADConfig) -> None:
    """Raise :class:`ConfigError` if the sizes of ``config`` cannot build a model or quantize it."""
    m, p = config.model, config.parallel
    _check_at_least("model", m, ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                 "num_query_groups", "vocab_size", "seq_length", "moe_router_topk"))
    _check_at_least("model", m, ("num_moe_experts", "moe_shared_expert_intermediate_size"), minimum=0)
    _check_at_least("parallel", p, ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                                    "expert_model_parallel_size", "context_parallel_size"))
    _require(m.init_method_std > 0, f"'model.init_method_std' must be > 0, got {m.init_method_std}")
    _require(m.hidden_size % m.num_attention_heads == 0,
             f"'model.hidden_size' ({m.hidden_size}) must be a multiple of 'model.num_attention_heads' "
             f"({m.num_attention_heads}); change one of them")
    _require(m.num_attention_heads % m.num_query_groups == 0,
             f"'model.num_attention_heads' ({m.num_attention_heads}) must be a multiple of "
             f"'model.num_query_groups' ({m.num_query_groups}); change one of them")
    _validate_moe(m, p)
    _validate_parallel(m, p)
    _validate_nvfp4_k_dims(m, p)


def _validate_moe(m: ModelConfig, p: ParallelConfig) -> None:
    if not m.is_moe:
        _require(p.expert_model_parallel_size == 1,
                 f"'parallel.expert_model_parallel_size' is {p.expert_model_parallel_size} but the "
                 f"model is dense ('model.num_moe_experts' = 0); set it to 1 or add experts")
        return
    _require(m.moe_router_topk <= m.num_moe_experts,
             f"'model.moe_router_topk' ({m.moe_router_topk}) must be <= 'model.num_moe_experts' "
             f"({m.num_moe_experts})")
    _require(m.expert_ffn_hidden_size >= 1,
             f"'model.moe_ffn_hidden_size' must be >= 1, got {m.moe_ffn_hidden_size}")
    _require(m.num_moe_experts % p.expert_model_parallel_size == 0,
             f"'parallel.expert_model_parallel_size' ({p.expert_model_parallel_size}) must divide "
             f"'model.num_moe_experts' ({m.num_moe_experts})")


def _validate_parallel(m: ModelConfig, p: ParallelConfig) -> None:
    tp = p.tensor_model_parallel_size
    split_sizes = [(name, getattr(m, name))
                   for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size", "vocab_size")]
    if m.is_moe:
        split_sizes += [("moe_ffn_hidden_size", m.expert_ffn_hidden_size),
                        ("moe_shared_expert_intermediate_size", m.moe_shared_expert_intermediate_size)]
    for name, value in split_sizes:
        _require(value % tp == 0,
                 f"'parallel.tensor_model_parallel_size' ({tp}) must divide 'model.{name}' ({value}); "
                 f"change one of them")
    if m.is_moe:
        _require(tp == 1 or p.sequence_parallel,
                 "MoE layers under tensor parallelism need 'parallel.sequence_parallel: true' "
                 "(Megatron refuses to train them otherwise)")
    if tp > 1 and p.sequence_parallel:
        _require(m.seq_length % tp == 0,
                 f"with sequence parallelism 'parallel.tensor_model_parallel_size' ({tp}) must divide "
                 f"'model.seq_length' ({m.seq_length})")
    cp = p.context_parallel_size
    _require(m.seq_length % (2 * cp) == 0 or cp == 1,
             f"'model.seq_length' ({m.seq_length}) must be a multiple of 2 x "
             f"'parallel.context_parallel_size' ({2 * cp}) for load-balanced causal attention")
    _require(m.num_layers % p.pipeline_model_parallel_size == 0,
             f"'parallel.pipeline_model_parallel_size' ({p.pipeline_model_parallel_size}) must divide "
             f"'model.num_layers' ({m.num_layers})")


def _validate_nvfp4_k_dims(m: ModelConfig, p: ParallelConfig) -> None:
    """Every GEMM reduction dimension, whole and per tensor-parallel shard, splits into blocks of 16."""
    tp = p.tensor_model_parallel_size
    k_dims = [("hidden_size", m.hidden_size), ("ffn_hidden_size", m.ffn_hidden_size)]
    if m.is_moe:
        k_dims.append(("moe_ffn_hidden_size", m.expert_ffn_hidden_size))
        if m.moe_shared_expert_intermediate_size:
            k_dims.append(("moe_shared_expert_intermediate_size", m.moe_shared_expert_intermediate_size))
    for name, k in k_dims:
        _require(k % NVFP4_BLOCK_SIZE == 0,
                 f"'model.{name}' ({k}) is a GEMM reduction (K) dimension and must be a multiple of "
                 f"{NVFP4_BLOCK_SIZE} for NVFP4 blocks; use e.g. {_round_up(k, NVFP4_BLOCK_SIZE)}")
        _require((k // tp) % NVFP4_BLOCK_SIZE == 0,
                 f"'model.{name}' ({k}) split over 'parallel.tensor_model_parallel_size' ({tp}) gives "
                 f"K = {k // tp} per rank, not a multiple of {NVFP4_BLOCK_SIZE}; NVFP4 blocks would "
                 f"straddle ranks. Use a multiple of {NVFP4_BLOCK_SIZE * tp}, e.g. "
                 f"{_round_up(k, NVFP4_BLOCK_SIZE * tp)}")


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
