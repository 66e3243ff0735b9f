"""Build megatron.core GPT models (dense or MoE) from a :class:`~megatron_qad.config.ModelConfig`.

Models use megatron.core's local layer spec (no Transformer Engine), with two adjustments that are
plain spec choices: norms that accept sequence parallelism (:func:`sequence_parallel_torch_norm`)
and, on the CPU, weights drawn on the CPU and scattered to tensor-parallel shards
(``use_cpu_initialization``), which makes a model's function independent of its TP layout: at the
same seed, TP=1 and TP=2 builds compute the same logits. Expert parallelism is not layout-free at
initialisation: every EP rank draws its local experts from the same stream, so an EP=2 build
repeats experts 0-1 where EP=1 has 0-3; load weights to compare layouts.
"""

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.activations import squared_relu
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from .config import ConfigError, ModelConfig, ParallelConfig

_ACTIVATIONS = {"swiglu": (F.silu, True), "gelu": (F.gelu, False), "squared_relu": (squared_relu, False)}
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def sequence_parallel_torch_norm(config: TransformerConfig, hidden_size: int,
                                 eps: float = 1e-5) -> torch.nn.Module:
    """``torch.nn.RMSNorm`` or ``LayerNorm`` over the last dim, usable with sequence parallelism.

    The local spec's ``WrappedTorchNorm`` refuses ``sequence_parallel``. A norm acts per token,
    so splitting the sequence over TP ranks only changes its weight gradients into partial sums;
    marking the weights ``sequence_parallel`` makes megatron.core's ``finalize_model_grads``
    all-reduce them over the TP group, as it does for Transformer Engine norms.
    """
    norm_cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
    norm = norm_cls(hidden_size, eps=eps, dtype=config.params_dtype)
    for param in norm.parameters():
        param.sequence_parallel = config.sequence_parallel
    return norm


def transformer_config(model_cfg: ModelConfig, parallel_cfg: ParallelConfig,
                       device: torch.device) -> TransformerConfig:
    """The megatron.core TransformerConfig of ``model_cfg`` laid out as ``parallel_cfg`` (no dropout)."""
    activation_func, gated = _ACTIVATIONS[model_cfg.activation]
    dtype = _DTYPES[model_cfg.params_dtype]
    tp = parallel_cfg.tensor_model_parallel_size
    moe = {}
    if model_cfg.is_moe:
        moe = dict(
            num_moe_experts=model_cfg.num_moe_experts,
            moe_router_topk=model_cfg.moe_router_topk,
            moe_ffn_hidden_size=model_cfg.expert_ffn_hidden_size,
            moe_shared_expert_intermediate_size=model_cfg.moe_shared_expert_intermediate_size or None,
            moe_grouped_gemm=model_cfg.moe_grouped_gemm,
            moe_token_dispatcher_type=model_cfg.moe_token_dispatcher_type,
        )
    return TransformerConfig(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
        normalization=model_cfg.normalization,
        activation_func=activation_func,
        gated_linear_unit=gated,
        add_bias_linear=model_cfg.add_bias_linear,
        init_method_std=model_cfg.init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=parallel_cfg.pipeline_model_parallel_size,
        context_parallel_size=parallel_cfg.context_parallel_size,
        expert_model_parallel_size=parallel_cfg.expert_model_parallel_size,
        sequence_parallel=tp > 1 and parallel_cfg.sequence_parallel,
        use_cpu_initialization=device.type == "cpu",
        # No CUDA graphs; the empty list only avoids megatron.core's warning about its own default "full".
        cuda_graph_modules=[],
        **moe,
    )


def _check_buildable(model_cfg: ModelConfig, device: torch.device) -> None:
    """Raise ConfigError for settings the local spec (or the CPU) cannot build."""
    if model_cfg.is_moe and model_cfg.moe_grouped_gemm:
        raise ConfigError(
            "'model.moe_grouped_gemm: true' needs Transformer Engine's grouped-GEMM experts "
            "(TEGroupedMLP); megatron-core 0.19's local spec builds per-expert SequentialMLP only. "
            "Set model.moe_grouped_gemm=false")
    if model_cfg.is_moe and device.type == "cpu" and model_cfg.moe_token_dispatcher_type == "alltoall":
        raise ConfigError(
            "'model.moe_token_dispatcher_type: alltoall' creates a CUDA stream "
            "(MoEAlltoAllTokenDispatcher.__init__) and cannot run on the CPU; "
            "set model.moe_token_dispatcher_type=allgather")


def gpt_block_spec(config: TransformerConfig, model_cfg: ModelConfig) -> TransformerBlockSubmodules:
    """Local-spec layers (this pipeline stage's share) with sequence-parallel-capable norms."""
    layer = get_gpt_layer_local_spec(
        num_experts=model_cfg.num_moe_experts or None,
        moe_grouped_gemm=model_cfg.moe_grouped_gemm,
        normalization=model_cfg.normalization,
    )
    submodules = dataclasses.replace(layer.submodules,
                                     input_layernorm=sequence_parallel_torch_norm,
                                     pre_mlp_layernorm=sequence_parallel_torch_norm)
    layer = dataclasses.replace(layer, submodules=submodules)
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config),
                                      layer_norm=sequence_parallel_torch_norm)


def build_gpt_model(model_cfg: ModelConfig, parallel_cfg: ParallelConfig,
                    device: torch.device | str = "cpu") -> GPTModel:
    """Build this rank's part of the GPT model, initialised from ``model_cfg.seed``, on ``device``.

    Needs :func:`megatron_qad.parallel.initialize` first; ``device`` is its context's device.
    Parameters have ``model_cfg.params_dtype``.
    The model returns vocab-parallel logits [batch, seq, vocab / TP] from
    ``model(input_ids [b, s] int64, position_ids [b, s] int64, attention_mask)``; pass
    :func:`causal_attention_mask` as the mask.
    """
    device = torch.device(device)
    _check_buildable(model_cfg, device)
    config = transformer_config(model_cfg, parallel_cfg, device)
    torch.manual_seed(model_cfg.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(model_cfg.seed)
    model = GPTModel(
        config=config,
        transformer_layer_spec=gpt_block_spec(config, model_cfg),
        vocab_size=model_cfg.vocab_size,
        max_sequence_length=model_cfg.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=model_cfg.share_embeddings_and_output_weights,
        position_embedding_type=model_cfg.position_embedding_type,
        rotary_base=model_cfg.rotary_base,
    )
    return model.to(device)


def causal_attention_mask(seq_length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool [1, 1, s, s] mask, True where attention is forbidden (key after query).

    megatron.core builds this mask on "cuda" when given None, so CPU runs pass it explicitly.
    """
    mask = torch.ones(seq_length, seq_length, dtype=torch.bool, device=device).triu(diagonal=1)
    return mask[None, None]
