"""What each module of a megatron.core model is, for quantization policies and reports.

Kinds of linear layers (the modules a policy can put in NVFP4, ``policy.QUANTIZABLE_KINDS``):
``attention`` (QKV and output
projections), ``mlp`` (dense MLP), ``moe_expert`` (routed experts), ``shared_expert``,
``mamba_mixer`` (Mamba in/out projections), ``linear_replacement`` (the one hidden x hidden
linear layer a DeciLM block has in place of its attention, ``<layer>.self_attention``, or of its
MLP, ``<layer>.mlp``). Never quantized: ``router``, ``embedding``,
``output_layer`` (and norms). A module's kind comes from the outermost enclosing module whose
type names one, so an expert's own MLP counts as ``moe_expert``. (When every local expert's linear
layers are quantized, their ``SequentialMLP`` runs the experts' quantizers grouped: :mod:`.grouped_mlp`.)
"""

from dataclasses import dataclass

import torch
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.ssm.mamba_mixer import MambaMixer
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import Attention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.heterogeneous.linear_replacements import ColumnParallelLinearGathered
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.experts import SequentialMLP, TEGroupedMLP
from megatron.core.transformer.moe.router import Router
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP

from ..models import all_layer_types, decoder_layers
from .te_layers import hooked_te_linear_types, te_attention_types

LOCAL_LINEAR_TYPES = (ColumnParallelLinear, RowParallelLinear)
"""Linear layers of the local spec the hooks swap; with Transformer Engine installed,
:func:`~.te_layers.hooked_te_linear_types` adds those of the TE spec."""

_KIND_OF_ANCESTOR = (
    (LanguageModelEmbedding, "embedding"),
    (Router, "router"),
    (SharedExpertMLP, "shared_expert"),
    ((SequentialMLP, TEGroupedMLP), "moe_expert"),
    (Attention, "attention"),
    (MambaMixer, "mamba_mixer"),
    (MLP, "mlp"),
    (ColumnParallelLinearGathered, "linear_replacement"),
)


@dataclass(frozen=True)
class LinearModule:
    """A linear layer of the model: its name, module, kind, and whether it is a Mamba mixer that
    is the nearest Mamba layer before an attention layer."""

    name: str
    module: torch.nn.Module
    kind: str
    feeds_attention: bool = False


def _kind(name: str, modules: dict[str, torch.nn.Module]) -> str:
    parts = name.split(".")
    for depth in range(len(parts) + 1):
        ancestor = modules[".".join(parts[:depth])]
        for types, kind in _KIND_OF_ANCESTOR:
            if isinstance(ancestor, types):
                return kind
    return "other"


def _layers_feeding_attention(model: torch.nn.Module, whole_model_types: list[str]) -> list[str]:
    """Names of the decoder layers of ``model`` that are the nearest Mamba layer before an
    attention layer, given the types of all layers of the whole model (``all_layer_types``: under
    pipeline parallelism a Mamba layer at the end of one stage counts for an attention layer at
    the start of the next)."""
    feeding, last_mamba = set(), None
    for index, layer_type in enumerate(whole_model_types):
        if layer_type == "attention" and last_mamba is not None:
            feeding.add(last_mamba)
            last_mamba = None
        if layer_type == "mamba":
            last_mamba = index
    return [layer.name for layer in decoder_layers(model) if layer.index in feeding]


def linear_modules(model: torch.nn.Module, whole_model_types: list[str] | None = None) -> list[LinearModule]:
    """Every Megatron linear layer of ``model`` with its kind, in module order.

    ``whole_model_types``: ``models.all_layer_types`` of the whole model (default: computed from
    ``model``, a collective call over the pipeline group; pass it for a virtual-pipeline chunk).
    """
    modules = dict(model.named_modules())
    output_layers = {id(m.output_layer) for m in modules.values()
                     if isinstance(getattr(m, "output_layer", None), torch.nn.Module)}
    if whole_model_types is None:
        whole_model_types = all_layer_types(model)
    feeding = tuple(name + "." for name in _layers_feeding_attention(model, whole_model_types))
    linear_types = LOCAL_LINEAR_TYPES + hooked_te_linear_types()
    linears = []
    for name, module in modules.items():
        if isinstance(module, linear_types):
            kind = "output_layer" if id(module) in output_layers else _kind(name, modules)
            linears.append(LinearModule(name, module, kind, kind == "mamba_mixer" and name.startswith(feeding)))
    return linears


def core_attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The modules K and V enter in attention layers (``core_attention``: local or Transformer
    Engine ``DotProductAttention``), in module order."""
    attention_types = (DotProductAttention,) + te_attention_types()
    return [(name, module) for name, module in model.named_modules() if isinstance(module, attention_types)]


def find_unsupported(model: torch.nn.Module) -> list[str]:
    """Names of the Transformer Engine linear modules the hooks do not cover: any TE class with
    "Linear" in its name other than :func:`~.te_layers.hooked_te_linear_types`."""
    covered = hooked_te_linear_types()
    return [f"{name} ({type(module).__name__})" for name, module in model.named_modules()
            if type(module).__module__.startswith("megatron.core.extensions.transformer_engine")
            and "Linear" in type(module).__name__ and not isinstance(module, covered)]
