"""Per-layer blocks of a DeciLM model (Hugging Face ``model_type: nemotron-nas``, e.g.
Llama-3.3-Nemotron-Super-49B), read from its ``config.json`` without importing Megatron.

The file's ``block_configs`` holds one entry per decoder layer::

    {"attention": {"no_op": false, "replace_with_linear": false, "n_heads_in_group": 8},
     "ffn":       {"no_op": false, "replace_with_linear": false, "ffn_mult": 5.25}}

An attention part is grouped-query attention with ``num_attention_heads / n_heads_in_group`` K/V
groups, one ``hidden x hidden`` linear layer in its place (``replace_with_linear``), or nothing
(``no_op``); likewise an FFN part is a SwiGLU MLP of width :func:`ffn_mult_to_intermediate_size`,
one linear layer, or nothing. A part that is nothing has no norm either.

``model.heterogeneous_layers_config`` names the file; :func:`read_blocks` checks it against the
recipe (ConfigError naming that key and the file) and megatron.core's
``HeterogeneousTransformerConfig`` builds the model from the same file.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .config import ConfigError

KEY = "model.heterogeneous_layers_config"
"""The recipe key naming the file."""

PartKind = Literal["full", "linear", "none"]
"""What a block's attention or FFN part is: the full module, one linear layer, or nothing."""

# Sizes a DeciLM config.json may state besides block_configs, and the recipe key each must equal.
_SIZES_IN_FILE = {"num_hidden_layers": "num_layers", "hidden_size": "hidden_size",
                  "num_attention_heads": "num_attention_heads", "vocab_size": "vocab_size"}


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """The MLP width of a block with ``ffn_mult``: ``int(2 * ffn_mult * hidden_size / 3)`` rounded
    up to a multiple of 256, as the published DeciLM modeling code and megatron.core's
    ``MLPConfig.ffn_mult_to_intermediate_size`` compute it (elements)."""
    size = int(2 * ffn_mult * hidden_size / 3)
    return -(-size // 256) * 256


@dataclass(frozen=True)
class Block:
    """One decoder layer. ``attention`` / ``ffn``: what each part is; ``num_query_groups``: K/V
    groups of a full attention part (None otherwise); ``ffn_hidden_size``: width of a full MLP in
    elements (None otherwise)."""

    attention: PartKind
    ffn: PartKind
    num_query_groups: int | None
    ffn_hidden_size: int | None


def _part(entry: dict, name: str, where: str) -> tuple[PartKind, dict]:
    part = entry.get(name)
    if not isinstance(part, dict):
        raise ConfigError(f"{where} has no '{name}' mapping")
    no_op, linear = bool(part.get("no_op", False)), bool(part.get("replace_with_linear", False))
    if no_op and linear:
        raise ConfigError(f"{where}.{name} is both no_op and replace_with_linear; set one of them to false")
    return ("none" if no_op else "linear" if linear else "full"), part


def _block(entry, index: int, num_attention_heads: int, hidden_size: int, where: str) -> Block:
    where = f"{where}: block_configs[{index}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be a mapping with 'attention' and 'ffn', got {entry!r}")
    attention, attention_part = _part(entry, "attention", where)
    ffn, ffn_part = _part(entry, "ffn", where)
    groups = width = None
    if attention == "full":
        per_group = attention_part.get("n_heads_in_group")
        if not isinstance(per_group, int) or per_group < 1 or num_attention_heads % per_group:
            raise ConfigError(f"{where}.attention.n_heads_in_group is {per_group!r}; an attention block needs a "
                              f"positive divisor of model.num_attention_heads ({num_attention_heads})")
        groups = num_attention_heads // per_group
    elif attention_part.get("n_heads_in_group") is not None:
        raise ConfigError(f"{where}.attention has no attention (no_op or replace_with_linear) but "
                          f"n_heads_in_group {attention_part['n_heads_in_group']!r}; set it to null")
    if ffn == "full":
        mult = ffn_part.get("ffn_mult")
        if isinstance(mult, bool) or not isinstance(mult, int | float) or mult <= 0:
            raise ConfigError(f"{where}.ffn.ffn_mult is {mult!r}; an MLP block needs a positive number")
        width = ffn_mult_to_intermediate_size(mult, hidden_size)
    elif ffn_part.get("ffn_mult") is not None:
        raise ConfigError(f"{where}.ffn has no MLP (no_op or replace_with_linear) but ffn_mult "
                          f"{ffn_part['ffn_mult']!r}; set it to null")
    return Block(attention, ffn, groups, width)


def read_blocks(path: str | Path, sizes: dict[str, int]) -> list[Block]:
    """The blocks of the DeciLM config file at ``path``, checked against the recipe.

    ``sizes``: the recipe's ``num_layers``, ``hidden_size``, ``num_attention_heads`` and
    ``vocab_size`` (model keys -> values). Raises ConfigError naming :data:`KEY` and the file if it
    is missing or not JSON, or as :func:`parse_blocks`.
    """
    path = Path(path)
    where = f"'{KEY}' ({path})"
    if not path.is_file():
        raise ConfigError(f"{where}: file not found; give the path of the model's config.json (relative "
                          f"paths start at the current directory)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{where}: not valid JSON ({err}); give the model's config.json") from None
    return parse_blocks(data, sizes, where)


def parse_blocks(data, sizes: dict[str, int], where: str) -> list[Block]:
    """The blocks of a parsed DeciLM ``config.json`` (``where`` names it in errors), checked against
    ``sizes`` (see :func:`read_blocks`): ConfigError if it has no ``block_configs`` list of
    ``num_layers`` entries, states a size that differs, or has a block megatron.core cannot build."""
    if not isinstance(data, dict) or not isinstance(data.get("block_configs"), list):
        raise ConfigError(f"{where}: no 'block_configs' list; this key takes a DeciLM (nemotron-nas) config.json")
    for file_key, recipe_key in _SIZES_IN_FILE.items():
        if data.get(file_key) is not None and data[file_key] != sizes[recipe_key]:
            raise ConfigError(f"{where}: the file's {file_key} is {data[file_key]} but 'model.{recipe_key}' is "
                              f"{sizes[recipe_key]}; make them equal")
    entries = data["block_configs"]
    if len(entries) != sizes["num_layers"]:
        raise ConfigError(f"{where}: {len(entries)} block_configs but 'model.num_layers' is {sizes['num_layers']}; "
                          f"make them equal")
    return [_block(entry, index, sizes["num_attention_heads"], sizes["hidden_size"], where)
            for index, entry in enumerate(entries)]
