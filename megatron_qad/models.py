"""Build megatron.core GPT models (dense or MoE) and hybrid Mamba models from a
:class:`~megatron_qad.config.ModelConfig`, and describe their decoder layers.

DeciLM models (``model.heterogeneous_layers_config``: Llama-Nemotron-Super's blocks with their own
attention groups and MLP widths, linear replacements and no-op parts) are GPT models built from
megatron.core's heterogeneous local spec (:func:`~megatron_qad.heterogeneous.heterogeneous_block_spec`).

GPT models use megatron.core's Transformer Engine spec with ``model.transformer_impl:
transformer_engine`` (GPU only). Otherwise models use its local layer spec, with two adjustments that are
plain spec choices: norms that accept sequence parallelism (:func:`sequence_parallel_torch_norm`)
and, on the CPU, weights drawn on the CPU and scattered to tensor-parallel shards
(``use_cpu_initialization``), which makes a model's function independent of its TP layout: at the
same seed, TP=1 and TP=2 builds compute the same logits. Expert parallelism is not layout-free at
initialisation: every EP rank draws its local experts from the same stream, so an EP=2 build
repeats experts 0-1 where EP=1 has 0-3; load weights to compare layouts.

Hybrid models (``model.hybrid_layer_pattern``, :func:`build_hybrid_model`) are megatron.core
``HybridModel`` instances built from a local spec of megatron.core's own layer classes (megatron.core
ships only a Transformer Engine spec for them), see :func:`hybrid_stack_spec`. Their Mamba mixers
are not layout-free at initialisation either: ``conv1d``, ``dt_bias`` and ``A_log`` are drawn per
tensor-parallel rank from the TP-rank RNG stream, and ``in_proj`` packs [z | x | B | C | dt] rows
that TP splits per component (as megatron.core's ``sharded_state_dict`` does for checkpoints)
while the CPU initialisation scatters the drawn matrix in contiguous row blocks. On the CPU they
build (with the shims of :mod:`megatron_qad.cpu_support`) but their Mamba layers' forward needs a
GPU with mamba-ssm (and causal-conv1d for megatron.core's fused training path; without it the
unfused one, with a torch convolution).

:func:`decoder_layers` / :func:`layer_types` say, from the built modules, what each decoder layer
of a model is and where its attention, Mamba mixer and MLP / MoE modules are.
"""

import dataclasses
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.activations import squared_relu
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_layer_local_spec,
                                                      get_gpt_layer_local_submodules,
                                                      get_gpt_layer_with_transformer_engine_spec,
                                                      get_mlp_module_spec_for_backend)
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.attention import Attention
from megatron.core.transformer.heterogeneous.heterogeneous_config import HeterogeneousTransformerConfig
from megatron.core.transformer.heterogeneous.linear_replacements import ColumnParallelLinearGathered
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (TransformerBlock, TransformerBlockSubmodules,
                                                         get_num_layers_to_build)
from megatron.core.transformer.transformer_layer import (MoETransformerLayer, TransformerLayer,
                                                         TransformerLayerSubmodules)

from .config import HYBRID_PIPE, ConfigError, ModelConfig, ParallelConfig
from .grouped_experts import LocalSpecWithGroupedGemm
from .heterogeneous import heterogeneous_block_spec
from .sdpa_attention import causal_attention_mask as causal_attention_mask  # the mask the models here take
from .sdpa_attention import with_core_attention

_ACTIVATIONS = {"swiglu": (F.silu, True), "gelu": (F.gelu, False), "squared_relu": (squared_relu, False)}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
"""torch dtypes of the recipe's dtype names (``model.params_dtype``, ``export.dtype``)."""


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
    """The megatron.core TransformerConfig of ``model_cfg`` laid out as ``parallel_cfg`` (no dropout);
    a ``HeterogeneousTransformerConfig`` holding the block file's text when
    ``model.heterogeneous_layers_config`` is set."""
    activation_func, gated = _ACTIVATIONS[model_cfg.activation]
    dtype = DTYPES[model_cfg.params_dtype]
    tp = parallel_cfg.tensor_model_parallel_size
    moe = {}
    if model_cfg.is_moe:
        moe = dict(
            num_moe_experts=model_cfg.num_moe_experts,
            moe_router_topk=model_cfg.moe_router_topk,
            moe_router_score_function=model_cfg.moe_router_score_function,
            moe_router_enable_expert_bias=model_cfg.moe_router_enable_expert_bias,
            moe_router_topk_scaling_factor=model_cfg.moe_router_topk_scaling_factor,
            moe_router_bias_update_rate=model_cfg.moe_router_bias_update_rate,
            moe_router_pre_softmax=model_cfg.moe_router_pre_softmax,
            moe_router_num_groups=model_cfg.moe_router_num_groups,
            moe_router_group_topk=model_cfg.moe_router_group_topk,
            moe_ffn_hidden_size=model_cfg.expert_ffn_hidden_size,
            moe_shared_expert_intermediate_size=model_cfg.moe_shared_expert_intermediate_size or None,
            moe_shared_expert_gate=model_cfg.moe_shared_expert_gate,
            moe_grouped_gemm=model_cfg.moe_grouped_gemm,
            moe_token_dispatcher_type=model_cfg.moe_token_dispatcher_type,
        )
    hybrid = {}
    if model_cfg.is_hybrid:
        hybrid = dict(
            is_hybrid_model=True,  # one residual block per layer: output-layer init scaled for it
            mamba_state_dim=model_cfg.mamba_state_dim,
            mamba_head_dim=model_cfg.mamba_head_dim,
            mamba_num_groups=model_cfg.mamba_num_groups,
            mamba_num_heads=model_cfg.mamba_num_heads,
            # The fused training path calls causal_conv1d's CUDA kernels; without that package the
            # mixer runs megatron.core's unfused path (torch conv1d, then mamba_ssm's Triton scan).
            use_mamba_mem_eff_path=importlib.util.find_spec("causal_conv1d") is not None,
        )
    heterogeneous = {}
    if model_cfg.heterogeneous_layers_config is not None:
        # The file's text, parsed by megatron.core itself (the checks of config.py ran on the same file).
        heterogeneous = dict(heterogeneous_layers_config_encoded_json=Path(
            model_cfg.heterogeneous_layers_config).read_text())
    config_class = HeterogeneousTransformerConfig if heterogeneous else TransformerConfig
    return config_class(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
        normalization=model_cfg.normalization,
        layernorm_epsilon=model_cfg.norm_epsilon,
        activation_func=activation_func,
        gated_linear_unit=gated,
        add_bias_linear=model_cfg.add_bias_linear,
        add_qkv_bias=model_cfg.add_qkv_bias,
        kv_channels=model_cfg.kv_channels,
        init_method_std=model_cfg.init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=parallel_cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=(parallel_cfg.virtual_pipeline_model_parallel_size
                                              if parallel_cfg.virtual_pipeline_model_parallel_size > 1 else None),
        context_parallel_size=parallel_cfg.context_parallel_size,
        expert_model_parallel_size=parallel_cfg.expert_model_parallel_size,
        sequence_parallel=tp > 1 and parallel_cfg.sequence_parallel,
        use_cpu_initialization=device.type == "cpu",
        # Losses are token sums, averaged over the global batch's tokens by finalize_model_grads;
        # DistributedDataParallel reads this when it is built (to sum, not average, over DP).
        calculate_per_token_loss=True,
        # No CUDA graphs; the empty list only avoids megatron.core's warning about its own default "full".
        cuda_graph_modules=[],
        **moe,
        **hybrid,
        **heterogeneous,
    )


def _check_buildable(model_cfg: ModelConfig, device: torch.device) -> None:
    """Raise ConfigError for settings the spec (or the device) cannot build."""
    if model_cfg.transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import HAVE_TE

        if not HAVE_TE or device.type != "cuda":
            missing = "Transformer Engine is not installed" if not HAVE_TE else "this is the CPU"
            raise ConfigError(f"'model.transformer_impl: transformer_engine' needs Transformer Engine on a "
                              f"GPU ({missing}); set model.transformer_impl=local")
    if model_cfg.is_moe and device.type == "cpu" and model_cfg.moe_token_dispatcher_type == "alltoall":
        raise ConfigError(
            "'model.moe_token_dispatcher_type: alltoall' creates a CUDA stream "
            "(MoEAlltoAllTokenDispatcher.__init__) and cannot run on the CPU; "
            "set model.moe_token_dispatcher_type=allgather")
    if model_cfg.is_hybrid and "M" in model_cfg.hybrid_layer_symbols and device.type == "cuda":
        if importlib.util.find_spec("mamba_ssm") is None:
            raise ImportError(
                "the Mamba layers of 'model.hybrid_layer_pattern' run mamba_ssm's Triton SSD scan on the "
                "GPU; install mamba-ssm (and causal-conv1d for the fused path): "
                "pip install 'megatron-core[ssm]'")


def gpt_block_spec(config: TransformerConfig, model_cfg: ModelConfig,
                   vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """This pipeline stage's layers: local-spec ones with sequence-parallel-capable norms, or
    (``model.transformer_impl: transformer_engine``) megatron.core's Transformer Engine spec, or
    (``model.heterogeneous_layers_config``) :func:`~megatron_qad.heterogeneous.heterogeneous_block_spec`."""
    if model_cfg.heterogeneous_layers_config is not None:
        return heterogeneous_block_spec(config, sequence_parallel_torch_norm, vp_stage)
    layers = get_num_layers_to_build(config, vp_stage)
    if model_cfg.transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        layer = get_gpt_layer_with_transformer_engine_spec(num_experts=model_cfg.num_moe_experts or None,
                                                           moe_grouped_gemm=model_cfg.moe_grouped_gemm)
        return TransformerBlockSubmodules(layer_specs=[layer] * layers, layer_norm=TENorm)
    layer = get_gpt_layer_local_spec(num_experts=model_cfg.num_moe_experts or None,
                                     normalization=model_cfg.normalization)
    submodules = dataclasses.replace(layer.submodules,
                                     input_layernorm=sequence_parallel_torch_norm,
                                     pre_mlp_layernorm=sequence_parallel_torch_norm)
    if model_cfg.is_moe:
        submodules.mlp = get_mlp_module_spec_for_backend(LocalSpecWithGroupedGemm(), num_experts=model_cfg.num_moe_experts,
                                                         moe_grouped_gemm=model_cfg.moe_grouped_gemm)
    layer = with_core_attention(dataclasses.replace(layer, submodules=submodules), model_cfg.core_attention)
    return TransformerBlockSubmodules(layer_specs=[layer] * layers, layer_norm=sequence_parallel_torch_norm)


class LocalNormHybridStack(HybridStack):
    """megatron.core's ``HybridStack`` with a torch final norm instead of Transformer Engine's.

    ``HybridStack.__init__`` builds its final norm as ``TENorm`` whatever the spec says, which
    raises ImportError without Transformer Engine. This stack is built without it
    (``post_layer_norm=False``) and then gets :func:`sequence_parallel_torch_norm` under the same
    name, ``final_norm``, which ``HybridStack.forward`` applies when ``post_layer_norm`` is set.
    """

    def __init__(self, config: TransformerConfig, submodules: HybridStackSubmodules, *args,
                 post_layer_norm: bool = True, **kwargs):
        super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            self.final_norm = sequence_parallel_torch_norm(config, config.hidden_size,
                                                           eps=config.layernorm_epsilon)


def hybrid_stack_spec(model_cfg: ModelConfig) -> ModuleSpec:
    """Local (non Transformer Engine) spec of a hybrid stack: one layer spec per pattern symbol.

    It mirrors megatron.core's ``hybrid_layer_specs.hybrid_stack_spec`` with megatron.core's own
    modules in place of TE's, as ``get_gpt_layer_local_spec`` does for GPT layers: each
    TE layer-norm-fused linear becomes a separate norm (:func:`sequence_parallel_torch_norm`) and a
    ``ColumnParallelLinear``; attention is ``SelfAttention`` with local ``DotProductAttention`` (or
    :class:`~megatron_qad.sdpa_attention.SdpaAttention`, ``model.core_attention``).

    * ``M``: ``MambaLayer`` (norm + ``MambaMixer`` with ``in_proj`` ColumnParallelLinear and
      ``out_proj`` RowParallelLinear);
    * ``*``: ``TransformerLayer`` with only ``input_layernorm`` + ``self_attention``;
    * ``-``: ``MLPLayer`` with only ``pre_mlp_layernorm`` + dense ``MLP``;
    * ``E``: ``MoETransformerLayer`` with only ``pre_mlp_layernorm`` + ``MoELayer`` (SequentialMLP
      experts, optional shared expert).
    ``sharded_state_dict_keys_map`` gives the separate norms their TE-fused names in distributed
    checkpoints (``norm.weight`` of a Mamba layer is ``mixer.in_proj.layer_norm_weight``), as the
    local GPT spec does, so the checkpoint keys are those of the TE spec.
    """
    backend = LocalSpecWithGroupedGemm()
    gpt_layer = get_gpt_layer_local_submodules(normalization=model_cfg.normalization)
    mamba_layer = ModuleSpec(
        module=MambaLayer,
        submodules=MambaLayerSubmodules(
            norm=sequence_parallel_torch_norm,
            mixer=ModuleSpec(module=MambaMixer,
                             submodules=MambaMixerSubmodules(in_proj=backend.column_parallel_linear(),
                                                             out_proj=backend.row_parallel_linear())),
            mamba_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"norm.": "mixer.in_proj.layer_norm_"},
        ),
    )
    attention_layer = with_core_attention(ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=sequence_parallel_torch_norm,
            self_attention=gpt_layer.self_attention,
            self_attn_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_"},
        ),
    ), model_cfg.core_attention)
    mlp_layer = ModuleSpec(
        module=MLPLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=sequence_parallel_torch_norm,
            mlp=get_mlp_module_spec_for_backend(backend),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"},
        ),
    )
    submodules = HybridStackSubmodules(mamba_layer=mamba_layer, attention_layer=attention_layer,
                                       mlp_layer=mlp_layer)
    if model_cfg.is_moe:
        submodules.moe_layer = ModuleSpec(
            module=MoETransformerLayer,
            submodules=TransformerLayerSubmodules(
                pre_mlp_layernorm=sequence_parallel_torch_norm,
                mlp=get_mlp_module_spec_for_backend(backend, num_experts=model_cfg.num_moe_experts,
                                                    moe_grouped_gemm=model_cfg.moe_grouped_gemm),
                mlp_bda=get_bias_dropout_add,
            ),
        )
    return ModuleSpec(module=LocalNormHybridStack, submodules=submodules)


def hybrid_pattern_with_stages(model_cfg: ModelConfig, parallel_cfg: ParallelConfig) -> str:
    """``model_cfg.hybrid_layer_pattern`` with one ``|``-separated segment per (virtual) pipeline stage.

    A pattern with ``|`` is returned as it is; otherwise the layers are split into
    ``pipeline_model_parallel_size x virtual_pipeline_model_parallel_size`` equal shares
    (HybridModel would do the same split without virtual stages, with a deprecation warning for the
    missing ``|``; with them it needs the ``|``).
    """
    pattern = model_cfg.hybrid_layer_pattern
    stages = parallel_cfg.pipeline_model_parallel_size * parallel_cfg.virtual_pipeline_model_parallel_size
    if HYBRID_PIPE in pattern or stages == 1:
        return pattern
    share = len(pattern) // stages
    return HYBRID_PIPE.join(pattern[i:i + share] for i in range(0, len(pattern), share))


def _seed_everything(model_cfg: ModelConfig) -> None:
    torch.manual_seed(model_cfg.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(model_cfg.seed)


def build_hybrid_model(model_cfg: ModelConfig, parallel_cfg: ParallelConfig,
                       device: torch.device | str = "cpu", vp_stage: int | None = None) -> HybridModel:
    """Build this rank's part of the hybrid model of ``model_cfg.hybrid_layer_pattern``.

    Same contract as :func:`build_gpt_model` (seeded from ``model_cfg.seed``, parameters of
    ``model_cfg.params_dtype`` on ``device``, vocab-parallel logits [b, s, V / TP] from
    ``model(input_ids, position_ids, attention_mask)``). On the CPU the model builds but its
    Mamba layers raise NotImplementedError in forward (see :mod:`megatron_qad.cpu_support`); on a
    GPU they need mamba-ssm (ImportError here otherwise; causal-conv1d optional).
    """
    device = torch.device(device)
    if not model_cfg.is_hybrid:
        raise ConfigError("'model.hybrid_layer_pattern' is empty: this is a GPT model; "
                          "use build_model or build_gpt_model")
    _check_buildable(model_cfg, device)
    config = transformer_config(model_cfg, parallel_cfg, device)
    _seed_everything(model_cfg)
    model = HybridModel(
        config=config,
        hybrid_stack_spec=hybrid_stack_spec(model_cfg),
        vocab_size=model_cfg.vocab_size,
        max_sequence_length=model_cfg.seq_length,
        hybrid_layer_pattern=hybrid_pattern_with_stages(model_cfg, parallel_cfg),
        **_stage_arguments(vp_stage),
        parallel_output=True,
        share_embeddings_and_output_weights=model_cfg.share_embeddings_and_output_weights,
        position_embedding_type=model_cfg.position_embedding_type,
        rotary_base=model_cfg.rotary_base,
    )
    return _on_device_in_params_dtype(model, model_cfg, device)


def _stage_arguments(vp_stage: int | None) -> dict:
    """``pre_process`` / ``post_process`` / ``vp_stage`` of this rank's (virtual) pipeline stage."""
    return dict(pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                vp_stage=vp_stage)


def build_model(model_cfg: ModelConfig, parallel_cfg: ParallelConfig,
                device: torch.device | str = "cpu", vp_stage: int | None = None) -> GPTModel | HybridModel:
    """This rank's part (its virtual stage ``vp_stage``) of the model of ``model_cfg``: a hybrid
    model when ``model_cfg.hybrid_layer_pattern`` is set (:func:`build_hybrid_model`), else a GPT
    model (:func:`build_gpt_model`)."""
    if model_cfg.is_hybrid:
        return build_hybrid_model(model_cfg, parallel_cfg, device, vp_stage)
    return build_gpt_model(model_cfg, parallel_cfg, device, vp_stage)


def build_model_chunks(model_cfg: ModelConfig, parallel_cfg: ParallelConfig,
                       device: torch.device | str = "cpu") -> list[GPTModel | HybridModel]:
    """This rank's model chunks, as megatron.core's schedules take them: one per virtual pipeline
    stage (``parallel.virtual_pipeline_model_parallel_size``; one chunk without virtual stages).

    Chunk ``v`` holds the layers of virtual stage ``v`` of this pipeline rank; only chunk 0 of
    the first pipeline rank embeds and only the last chunk of the last rank has the output layer.
    """
    virtual = parallel_cfg.virtual_pipeline_model_parallel_size
    if virtual == 1:
        return [build_model(model_cfg, parallel_cfg, device)]
    return [build_model(model_cfg, parallel_cfg, device, vp_stage) for vp_stage in range(virtual)]


def build_gpt_model(model_cfg: ModelConfig, parallel_cfg: ParallelConfig,
                    device: torch.device | str = "cpu", vp_stage: int | None = None) -> GPTModel:
    """Build this rank's part of the GPT model, initialised from ``model_cfg.seed``, on ``device``.

    Needs :func:`megatron_qad.parallel.initialize` first; ``device`` is its context's device.
    ``vp_stage``: the virtual pipeline stage this chunk is (None without virtual stages; see
    :func:`build_model_chunks`).
    Parameters have ``model_cfg.params_dtype``.
    The model returns vocab-parallel logits [batch, seq, vocab / TP] from
    ``model(input_ids [b, s] int64, position_ids [b, s] int64, attention_mask)``; pass
    :func:`causal_attention_mask` as the mask.
    """
    device = torch.device(device)
    if model_cfg.is_hybrid:
        raise ConfigError(f"'model.hybrid_layer_pattern' is {model_cfg.hybrid_layer_pattern!r}: this "
                          f"is a hybrid model; use build_model or build_hybrid_model")
    _check_buildable(model_cfg, device)
    config = transformer_config(model_cfg, parallel_cfg, device)
    _seed_everything(model_cfg)
    model = GPTModel(
        config=config,
        transformer_layer_spec=gpt_block_spec(config, model_cfg, vp_stage),
        vocab_size=model_cfg.vocab_size,
        max_sequence_length=model_cfg.seq_length,
        **_stage_arguments(vp_stage),
        parallel_output=True,
        share_embeddings_and_output_weights=model_cfg.share_embeddings_and_output_weights,
        position_embedding_type=model_cfg.position_embedding_type,
        rotary_base=model_cfg.rotary_base,
        rope_scaling=model_cfg.rope_scaling,
        rope_scaling_factor=model_cfg.rope_scaling_factor,
    )
    return _on_device_in_params_dtype(model, model_cfg, device)


def _on_device_in_params_dtype(model: torch.nn.Module, model_cfg: ModelConfig, device: torch.device):
    """``model`` on ``device`` with every parameter in ``model_cfg.params_dtype``, as Megatron-LM's
    Float16Module leaves a bf16 model. megatron.core creates a few parameters in fp32 whatever
    ``params_dtype`` says (the routers' weights, Mamba's A_log, D and dt_bias); its mixed-precision
    optimizer maps checkpoint state to parameters as if all were bf16, so a bf16 model holding fp32
    parameters could not save its optimizer. Buffers keep their dtype (the routers' fp32 expert bias).
    The routers cast their weight to the input's dtype anyway; Mamba's A_log, D and dt_bias hold
    bf16 values, as in Megatron-LM's bf16 models (the mixer computes with them in fp32, and the
    optimizer's fp32 main weights keep full precision)."""
    dtype = DTYPES[model_cfg.params_dtype]
    model = model.to(device)
    for parameter in model.parameters():
        if parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)
    return model


# ---------------------------------------------------------------------------------------------
# What each decoder layer of a built model is.

LayerType = Literal["mamba", "attention", "mlp", "moe", "linear", "noop"]
MlpType = Literal["mlp", "moe", "linear"]


@dataclasses.dataclass(frozen=True)
class DecoderLayer:
    """One decoder layer of a built model, described from its modules.

    ``name`` is the layer's module name (``"decoder.layers.3"``, with any wrapper's prefix such as
    ``"module."``), ``index`` its 0-based position among all decoder layers of the whole model
    (megatron's ``layer_number - 1``: pipeline stages after the first start past 0), ``type`` what
    mixes its tokens or, for a layer without a mixer, its MLP kind:

    ============  ==========================================  ===========================  ==========
    ``type``      layer                                       ``mixer``                    ``mlp``
    ============  ==========================================  ===========================  ==========
    "mamba"       ``MambaLayer`` (hybrid ``M``)               ``<name>.mixer`` MambaMixer  None
    "attention"   ``TransformerLayer`` with self-attention:   ``<name>.self_attention``    None, or
                  hybrid ``*`` (no MLP) or a GPT layer        (an ``Attention``)           ``<name>.mlp``
                  (attention + MLP or MoE)                                                 for GPT
    "mlp"         ``MLPLayer`` (hybrid ``-``), or a           None                         ``<name>.mlp``
                  heterogeneous layer without attention
    "moe"         ``MoETransformerLayer`` (hybrid ``E``)      None                         ``<name>.mlp``
    "linear"      heterogeneous layer whose only GEMM is      None                         ``<name>.mlp``
                  one linear layer (no attention, no MLP)                                  or None
    "noop"        heterogeneous layer with neither part       None                         None
                  (it passes its input on unchanged)
    ============  ==========================================  ===========================  ==========

    ``mlp_type`` is "mlp" (a dense ``MLP``), "moe" (a ``MoELayer``: ``router``,
    ``experts.local_experts.<i>``, optional ``shared_experts``) or "linear" (a DeciLM FFN replaced
    by one linear layer) for the module at ``mlp``, None when there is none. So a GPT-MoE layer is
    ``type="attention", mlp_type="moe"``: its MoE modules are under ``mlp`` just as in a hybrid
    ``E`` layer, and a policy keeping attention in BF16 keeps ``mixer`` (not the whole layer) for
    such layers. ``attention_linear`` is ``<name>.self_attention`` where a DeciLM block replaced
    attention by one linear layer (it mixes no tokens, so it is no ``mixer``), else None.
    """

    name: str
    index: int
    type: LayerType
    mixer: str | None
    mlp: str | None
    mlp_type: MlpType | None
    attention_linear: str | None = None


def _mlp_type(module: torch.nn.Module) -> MlpType | None:
    if isinstance(module, MoELayer):
        return "moe"
    if isinstance(module, MLP):
        return "mlp"
    if isinstance(module, ColumnParallelLinearGathered):
        return "linear"
    if isinstance(module, IdentityOp):
        return None  # the layer has no MLP
    raise TypeError(f"unknown MLP module {type(module).__name__}")


def _describe_layer(name: str, layer: torch.nn.Module) -> DecoderLayer:
    index = layer.layer_number - 1
    if isinstance(layer, MambaLayer):
        if not isinstance(layer.mixer, MambaMixer):
            raise TypeError(f"{name}: a MambaLayer whose mixer is a {type(layer.mixer).__name__}, "
                            f"not a MambaMixer")
        return DecoderLayer(name, index, "mamba", f"{name}.mixer", None, None)
    if not isinstance(layer, TransformerLayer):
        raise TypeError(f"{name}: unknown decoder layer class {type(layer).__name__}")
    try:
        mlp_type = _mlp_type(layer.mlp)
    except TypeError as err:
        raise TypeError(f"{name}.mlp: {err}") from None
    mlp = f"{name}.mlp" if mlp_type else None
    attention = layer.self_attention
    if isinstance(attention, Attention):
        return DecoderLayer(name, index, "attention", f"{name}.self_attention", mlp, mlp_type)
    if isinstance(attention, ColumnParallelLinearGathered):
        return DecoderLayer(name, index, mlp_type or "linear", None, mlp, mlp_type, f"{name}.self_attention")
    if not isinstance(attention, IdentityOp):
        raise TypeError(f"{name}: unknown token mixer {type(attention).__name__} "
                        f"(e.g. a gated delta net), not an attention or Mamba layer")
    return DecoderLayer(name, index, mlp_type or "noop", None, mlp, mlp_type)


def decoder_layers(model: torch.nn.Module) -> list[DecoderLayer]:
    """Every decoder layer of this rank's part of ``model`` (GPT or hybrid), in order.

    Found by module class, not from a config: each ``TransformerBlock`` (GPT) or ``HybridStack``
    (hybrid) inside ``model`` (also under wrappers such as DDP) contributes its ``layers``.
    Raises TypeError for a layer that is none of the types of :class:`DecoderLayer`.
    """
    layers = []
    for block_name, block in model.named_modules():
        if isinstance(block, TransformerBlock | HybridStack):
            prefix = f"{block_name}.layers" if block_name else "layers"
            layers += [_describe_layer(f"{prefix}.{i}", layer) for i, layer in enumerate(block.layers)]
    return layers


def layer_types(model: torch.nn.Module) -> list[tuple[str, LayerType]]:
    """``(module name, type)`` of every decoder layer of this rank's part of ``model``, in order.

    ``type`` is "mamba", "attention", "mlp", "moe", "linear" or "noop" (see :class:`DecoderLayer`; a
    GPT layer, which holds attention and an MLP or MoE, is "attention"; :func:`decoder_layers` also
    names its MLP).
    """
    return [(layer.name, layer.type) for layer in decoder_layers(model)]


def all_layer_types(model: torch.nn.Module | Sequence[torch.nn.Module]) -> list[LayerType]:
    """The types of all decoder layers of the whole model, by :attr:`DecoderLayer.index`.

    ``model``: this rank's model, or its list of virtual-pipeline chunks (all of them: together
    with the other pipeline ranks' chunks they hold every layer).
    Under pipeline parallelism each rank builds only its stage's layers, but what a layer feeds
    (e.g. whether the Mamba layer at the end of a stage precedes an attention layer at the start of
    the next) depends on the others: the stages' layer types are all-gathered over the pipeline
    group, so every rank of that group must call this. Without pipeline parallelism no
    communication happens.
    """
    chunks = [model] if isinstance(model, torch.nn.Module) else list(model)
    local = [(layer.index, layer.type) for chunk in chunks for layer in decoder_layers(chunk)]
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        group = parallel_state.get_pipeline_model_parallel_group()
        stages = [None] * torch.distributed.get_world_size(group)
        torch.distributed.all_gather_object(stages, local, group=group)
        local = [entry for stage in stages for entry in stage]
    local.sort()
    indices = [index for index, _ in local]
    if indices != list(range(len(indices))):
        raise RuntimeError(f"decoder layer indices {indices} are not 0..{len(indices) - 1}; with "
                           f"virtual pipeline stages pass all of this rank's model chunks")
    return [layer_type for _, layer_type in local]
