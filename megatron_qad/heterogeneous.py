"""The layers of a DeciLM model (``model.heterogeneous_layers_config``): megatron.core's
heterogeneous local spec, with torch norms that accept sequence parallelism and a linear
replacement that returns the residual stream's layout under sequence parallelism.

A DeciLM block may replace its attention or its MLP by one ``hidden x hidden`` linear layer.
megatron.core 0.19 builds it as ``ColumnParallelLinearGathered``: a column-parallel GEMM whose
``[s, b, hidden / TP]`` output must become the residual's layout again, ``[s, b, hidden]`` without
sequence parallelism (an all-gather of the columns, which it does) or ``[s / TP, b, hidden]`` with it,
where it pads the output to full width with zeros and reduce-scatters the sequence. Its padding
passes ``[0, 0, 0, 0, before, after]`` to ``torch.nn.functional.pad``, which reads pad pairs from
the *last* dimension forward, so it pads the sequence dimension instead of the hidden one and the
result does not fit the residual (a shape error at TP >= 2 with sequence parallelism).
:class:`LinearReplacement` pads the hidden dimension; everything else (parameters, their names and
initialisation, the GEMM) is megatron.core's.
"""

import dataclasses
import functools

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt.heterogeneous.heterogeneous_layer_specs import get_gpt_heterogeneous_layer_spec
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.tensor_parallel.mappings import (gather_from_tensor_model_parallel_region,
                                                    reduce_scatter_to_sequence_parallel_region)
from megatron.core.transformer.heterogeneous.heterogeneous_config import HeterogeneousTransformerConfig
from megatron.core.transformer.heterogeneous.linear_replacements import ColumnParallelLinearGathered
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules


def to_residual_layout(output: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """A column-parallel output ``[s, b, hidden / TP]`` (this rank's columns, every token) in the
    residual stream's layout: ``[s / TP, b, hidden]`` (this rank's tokens, every column) with
    sequence parallelism, else ``[s, b, hidden]``. The identity at TP=1."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return output
    if not sequence_parallel:
        return gather_from_tensor_model_parallel_region(output)
    width = output.shape[-1]
    before = parallel_state.get_tensor_model_parallel_rank() * width
    # Zeros elsewhere: the reduce-scatter's sum over ranks then places each rank's columns.
    return reduce_scatter_to_sequence_parallel_region(F.pad(output, (before, (tp - 1) * width - before)))


class LinearReplacement(ColumnParallelLinearGathered):
    """megatron.core's ``ColumnParallelLinearGathered`` (a DeciLM block's attention or MLP replaced by
    one ``hidden x hidden`` linear layer, no bias) with :func:`to_residual_layout` after its GEMM.

    ``forward(x [s(/TP), b, hidden], **ignored)`` returns ``(y, None)`` with ``y`` in ``x``'s layout.
    """

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None, **kwargs):
        if runtime_gather_output or self.gather_output:
            raise ValueError("a linear replacement gathers its output itself; do not ask for gather_output")
        output, bias = ColumnParallelLinear.forward(self, input_, weight, runtime_gather_output)
        return to_residual_layout(output, self.config.sequence_parallel), bias


def _linear_replacement(spec):
    """``spec`` with :class:`LinearReplacement` where megatron.core's spec builds its
    ``ColumnParallelLinearGathered`` (a ModuleSpec for attention, a partial for the MLP)."""
    if isinstance(spec, ModuleSpec) and spec.module is ColumnParallelLinearGathered:
        return dataclasses.replace(spec, module=LinearReplacement)
    if isinstance(spec, functools.partial) and spec.func is ColumnParallelLinearGathered:
        return functools.partial(LinearReplacement, *spec.args, **spec.keywords)
    return spec


def heterogeneous_block_spec(config: HeterogeneousTransformerConfig, norm,
                             vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """This pipeline stage's layers of a DeciLM model: megatron.core's heterogeneous local spec
    (``get_gpt_heterogeneous_layer_spec(use_te=False)``) with ``norm`` (a norm builder taking
    ``(config, hidden_size, eps)``) for its norms and :class:`LinearReplacement` for its linear
    replacements.

    megatron.core's spec gives each layer, from its block: ``SelfAttention`` (local linear and
    ``DotProductAttention`` modules, the block's K/V groups), a linear replacement in place of
    attention or of the MLP, or ``IdentityOp`` for a part that is nothing, whose norm is
    ``IdentityOp`` too; an MLP gets its block's width from ``config.get_config_for_layer``. Its
    norms (``WrappedTorchNorm``, which refuses sequence parallelism) are replaced where they exist.
    Its checkpoint key map is kept: as in the local GPT spec, norms are saved under the names of
    Transformer Engine's fused ones.
    """
    block = get_gpt_heterogeneous_layer_spec(config, use_te=False, vp_stage=vp_stage)
    layer_specs = []
    for layer in block.layer_specs:
        parts = layer.submodules
        submodules = dataclasses.replace(
            parts,
            input_layernorm=parts.input_layernorm if parts.input_layernorm is IdentityOp else norm,
            pre_mlp_layernorm=parts.pre_mlp_layernorm if parts.pre_mlp_layernorm is IdentityOp else norm,
            self_attention=_linear_replacement(parts.self_attention),
            mlp=_linear_replacement(parts.mlp))
        layer_specs.append(dataclasses.replace(layer, submodules=submodules))
    return TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=norm)
