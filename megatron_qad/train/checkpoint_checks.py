"""Checks of a megatron.core dist checkpoint before it is loaded into a model.

Without them a cut file surfaces as an ``EOFError`` deep in torch's unpickler and a model of other
sizes as a shape error of one tensor. Here both become a :class:`~megatron_qad.config.ConfigError`
that names the damaged file, or the recipe keys whose values disagree with the checkpoint:

- :func:`check_checkpoint_files`: every file the checkpoint's index (torch.distributed.checkpoint's
  ``.metadata``) points into exists and is at least as long as the index says;
- :func:`check_fits_model`: the checkpoint's tensors have the global shapes of the model's (from
  the checkpoint's metadata, nothing is read), and a strict load finds every tensor it needs.
"""

import json
import re
from pathlib import Path

from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
from torch.distributed.checkpoint import FileSystemReader

from ..config import ConfigError

_RECREATE = ("copy it again, or delete the directory and re-create it (a teacher trained here by "
             "'teacher.pretrain_iters' is trained again where its directory does not exist)")

HIDDEN = "model.hidden_size"
SIZE_RULES = (
    (r"(^|\.)embedding\.word_embeddings\.weight$", {-2: "model.vocab_size", -1: HIDDEN}),
    (r"^output_layer\.weight$", {-2: "model.vocab_size", -1: HIDDEN}),
    (r"^decoder\.final_(layer)?norm\.weight$", {-1: HIDDEN}),
    (r"^decoder\.layers\.[a-z_]", {0: "model.num_layers"}),
    (r"\.self_attention\.linear_proj\.weight$",
     {-2: HIDDEN, -1: "model.num_attention_heads x the head size (model.kv_channels, or hidden_size / heads)"}),
    (r"\.self_attention\.linear_qkv\.weight$",
     {-2: "(model.num_attention_heads + 2 x model.num_query_groups) x the head size (model.kv_channels, or "
          "hidden_size / heads)", -1: HIDDEN}),
    (r"\.mlp\.linear_fc2\.weight$", {-2: HIDDEN, -1: "model.ffn_hidden_size"}),
    (r"\.mlp\.router\.weight$", {-2: "model.num_moe_experts", -1: HIDDEN}),
    (r"\.mlp\.experts\.experts\.linear_fc2\.weight$",
     {-3: "model.num_moe_experts", -2: HIDDEN, -1: "model.moe_ffn_hidden_size"}),
    (r"\.mlp\.shared_experts\.linear_fc2\.weight$", {-2: HIDDEN, -1: "model.moe_shared_expert_intermediate_size"}),
    (r"\.mixer\.out_proj\.weight$", {-2: HIDDEN, -1: "model.mamba_num_heads x model.mamba_head_dim"}),
    (r"\.mixer\.A_log$", {-1: "model.mamba_num_heads"}),
)
"""Per dist-checkpoint key pattern, which recipe key sets which dimension of the tensor's global
shape (negative: counted from the end, so stacked layer and expert dimensions do not matter;
``0``: the layer dimension that megatron.core stacks a GPT model's layers along)."""

ARCHITECTURE_HINTS = (
    (r"\.mlp\.router\.expert_bias$", "model.moe_router_enable_expert_bias"),
    (r"\.shared_experts\.gate_weight$", "model.moe_shared_expert_gate"),
    (r"\.mlp\.shared_experts\.", "model.moe_shared_expert_intermediate_size"),
    (r"\.mlp\.(router|experts)\.", "model.num_moe_experts"),
    (r"\.linear_qkv\.bias$", "model.add_qkv_bias"),
    (r"\.bias$", "model.add_bias_linear"),
    (r"^output_layer\.", "model.share_embeddings_and_output_weights"),
    (r"^embedding\.position_embeddings\.", "model.position_embedding_type"),
    (r"\.mlp\.linear_fc[12]\.", "model.num_moe_experts"),
    (r"\.(mixer|self_attention)\.|^decoder\.layers\.\d", "model.hybrid_layer_pattern / model.num_layers"),
)
"""Recipe keys that decide whether a model has a tensor (a key present on one side only)."""


def check_checkpoint_files(directory: str | Path) -> None:
    """Raise ConfigError naming the file when a file of the dist checkpoint at ``directory`` is
    missing, shorter than its index says (a cut copy), or when ``metadata.json`` or the index
    cannot be read. Reads the index only; returns None. Checkpoints of other backends than
    ``torch_dist`` (megatron.core's default) are checked for ``metadata.json`` alone."""
    directory = Path(directory)
    try:
        backend = json.loads((directory / "metadata.json").read_text()).get("sharded_backend")
    except (OSError, ValueError, AttributeError) as error:
        raise ConfigError(f"checkpoint '{directory}' is damaged: {directory / 'metadata.json'} cannot be read "
                          f"({type(error).__name__}: {error}); {_RECREATE}") from None
    if backend != "torch_dist":
        return
    try:
        storage = FileSystemReader(str(directory)).read_metadata().storage_data
    except Exception as error:  # a cut or garbled pickle fails with many error types
        raise ConfigError(f"checkpoint '{directory}' is damaged: its index {directory / '.metadata'} cannot be "
                          f"read ({type(error).__name__}: {error}); {_RECREATE}") from None
    needed = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = directory / name
        if not path.is_file():
            raise ConfigError(f"checkpoint '{directory}' is damaged: {path} is missing; {_RECREATE}")
        if path.stat().st_size < size:
            raise ConfigError(f"checkpoint '{directory}' is damaged: {path} has {path.stat().st_size} bytes but "
                              f"its index needs {size} (the file was cut short); {_RECREATE}")


def check_fits_model(state: dict, saved: dict, directory: str | Path, strict: bool) -> None:
    """Compare a model's sharded state dict ``state`` (key -> ShardedTensor / ShardedObject / ...,
    already pointed at the checkpoint's names) with the checkpoint's metadata ``saved`` (its
    ``load_sharded_metadata``: key -> ShardedTensor with the global shape).

    Raises ConfigError naming the recipe keys (see :data:`SIZE_RULES`) when a tensor has another
    global shape there, and, for a ``strict`` load, when the model has a tensor the checkpoint
    lacks (see :data:`ARCHITECTURE_HINTS`). Tensors that megatron.core builds from factories
    (SwiGLU's fc1 halves) are not compared: the fc2 beside them has the same sizes."""
    mismatches = [(value.key, tuple(saved[value.key].global_shape), tuple(value.global_shape))
                  for value in state.values()
                  if isinstance(value, ShardedTensor) and isinstance(saved.get(value.key), ShardedTensor)
                  and tuple(saved[value.key].global_shape) != tuple(value.global_shape)]
    if mismatches:
        raise ConfigError(_sizes_message(mismatches, directory))
    if not strict:
        return
    ours = {value.key for value in state.values() if isinstance(value, ShardedTensor)}  # factories save other keys
    theirs = {key for key, value in saved.items() if isinstance(value, ShardedTensor)}
    missing = sorted(ours - theirs)
    if missing:
        keys = _architecture_keys(missing + sorted(theirs - ours))
        raise ConfigError(f"checkpoint '{directory}' holds another architecture than the recipe's model: it has "
                          f"no tensor '{missing[0]}'" + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else "")
                          + f"; set {' / '.join(keys) if keys else 'the model.* keys'} as the checkpoint's model "
                            f"was built, or point at the checkpoint of this model")


def _sizes_message(mismatches: list, directory) -> str:
    """One line naming every recipe key that a shape difference of ``mismatches`` pins down."""
    named = {}
    for key, there, here in mismatches:
        if len(there) != len(here):
            continue
        for pattern, dims in SIZE_RULES:
            if re.search(pattern, key):
                for dim, name in dims.items():
                    if -len(here) <= dim < len(here) and here[dim] != there[dim]:
                        named.setdefault(name, (here[dim], there[dim]))
    plain = {name: values for name, values in named.items() if re.fullmatch(r"model\.\w+", name)}
    named = plain or named  # a derived size (heads x head size) differs because a plain key does
    key, there, here = mismatches[0]
    example = f"e.g. '{key}' is {list(there)} in the checkpoint and {list(here)} here"
    if not named:
        return (f"checkpoint '{directory}' holds a model of other sizes than the recipe's ({example}); set the "
                f"model.* sizes to those of the checkpoint's model")
    differences = "; ".join(f"{name} gives {here_value} here but {there_value} in the checkpoint"
                            for name, (here_value, there_value) in named.items())
    return (f"checkpoint '{directory}' holds a model of other sizes than the recipe's: {differences} ({example}); "
            f"set these recipe keys to the checkpoint's values")


def _architecture_keys(keys: list[str]) -> list[str]:
    """The recipe keys of :data:`ARCHITECTURE_HINTS` that decide whether tensors ``keys`` exist, in order."""
    found = []
    for key in keys:
        for pattern, name in ARCHITECTURE_HINTS:
            if re.search(pattern, key):
                if name not in found:
                    found.append(name)
                break
    return found
