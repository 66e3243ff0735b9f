"""Nemotron-H (``NemotronHForCausalLM``: Nemotron-H, Nemotron Nano 2, Nemotron 3 Nano) as a hybrid
model: one layer per symbol of ``hybrid_override_pattern`` (or transformers 5's ``layers_block_type``)
- ``M`` Mamba2, ``*`` GQA attention without position embedding, ``-`` squared-ReLU MLP, ``E`` MoE.

=====================================================  ==============================================
config.json                                            model:
=====================================================  ==============================================
hidden_size, vocab_size, num_attention_heads,          hidden_size, vocab_size, num_attention_heads,
num_key_value_heads, head_dim                          num_query_groups, kv_channels
mamba_num_heads, mamba_head_dim, ssm_state_size,       mamba_num_heads, mamba_head_dim,
n_groups                                               mamba_state_dim, mamba_num_groups
intermediate_size, mlp_hidden_act relu2                ffn_hidden_size, activation squared_relu
n_routed_experts, num_experts_per_tok,                 num_moe_experts, moe_router_topk,
moe_intermediate_size,                                 moe_ffn_hidden_size,
moe_shared_expert_intermediate_size (n_shared 1)       moe_shared_expert_intermediate_size (ungated)
routed_scaling_factor                                  moe_router_topk_scaling_factor
(sigmoid router, e_score_correction_bias)              moe_router_score_function sigmoid,
                                                       moe_router_enable_expert_bias
n_group, topk_group (n_group 1: no groups)             moe_router_num_groups, moe_router_group_topk
layer_norm_epsilon (1e-5: the Mamba gated norm's)      norm_epsilon
tie_word_embeddings                                    share_embeddings_and_output_weights
=====================================================  ==============================================

NemotronH's router weights the chosen experts' sigmoid scores, renormalised when ``norm_topk_prob``,
times ``routed_scaling_factor``; megatron.core's sigmoid router renormalises exactly when top-k > 1,
so ``norm_topk_prob`` must equal ``num_experts_per_tok > 1``. Its group-limited choice ranks groups
by their top-2 scores, megatron.core's by their top-(topk / topk_group): groups import only when
``num_experts_per_tok / topk_group`` is 2. Refused too: biases (``attention_bias``, ``mlp_bias``,
``use_bias``, ``mamba_proj_bias``), a Mamba convolution other than megatron.core's (``conv_kernel``
4 with bias), another Mamba activation, ``residual_in_fp32``, latent MoE, multi-token prediction
layers, sliding windows. (transformers' NemotronH clamps the Mamba step size below at
``time_step_min``; megatron.core does not: the two agree wherever softplus(dt + dt_bias) is above it.)
"""

from ..export.hf_names import MAMBA_CONV_KERNEL, MAMBA_NORM_EPS
from .family import Family, HFConfig, register
from .llama import DEFAULT_SEQ_LENGTH

_LAYER_SYMBOLS = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*", "mlp": "-",
                  "moe": "E"}
"""transformers' layer-type names (``layers_block_type``) -> pattern symbols."""


def layer_pattern(config: HFConfig) -> str:
    """The hybrid pattern: ``hybrid_override_pattern``, else ``layers_block_type`` / ``layer_types``."""
    if "hybrid_override_pattern" in config:
        pattern = config.get("hybrid_override_pattern")
        if not isinstance(pattern, str) or set(pattern) - set("M*-E"):
            raise config.refuse("hybrid_override_pattern", pattern,
                                "layers are M (Mamba2), * (attention), - (MLP) or E (MoE)")
        return pattern
    key = "layers_block_type" if "layers_block_type" in config else "layer_types"
    kinds = config.get(key)
    if not isinstance(kinds, list) or set(kinds) - set(_LAYER_SYMBOLS):
        raise config.refuse(key, kinds, f"layer types are {sorted(_LAYER_SYMBOLS)}")
    return "".join(_LAYER_SYMBOLS[kind] for kind in kinds)


def _refuse_unsupported(config: HFConfig) -> None:
    no_bias = "megatron_qad builds Nemotron-H's projections without biases, as the published models have them"
    for key in ("attention_bias", "mlp_bias", "use_bias", "mamba_proj_bias"):
        config.expect(key, [False], False, no_bias)
    config.expect("use_conv_bias", [True], True, "megatron.core's Mamba convolution has a bias")
    config.expect("conv_kernel", [MAMBA_CONV_KERNEL], MAMBA_CONV_KERNEL,
                  f"megatron.core's Mamba convolution is {MAMBA_CONV_KERNEL} wide")
    config.expect("mamba_hidden_act", ["silu"], "silu", "megatron.core's Mamba2 mixer gates with SiLU")
    config.expect("mlp_hidden_act", ["relu2"], "relu2", "megatron_qad maps Nemotron-H MLPs as squared ReLU (relu2)")
    config.expect("residual_in_fp32", [False], False, "megatron_qad keeps the residual stream in params_dtype")
    config.expect("moe_latent_size", [None], None, "megatron_qad builds experts on the full hidden size")
    config.expect("num_nextn_predict_layers", [0], 0, "megatron_qad does not build multi-token prediction layers")
    config.expect("sliding_window", [None], None, "megatron_qad builds full causal attention")


def _routing_fields(config: HFConfig) -> dict:
    topk = config.int("num_experts_per_tok")
    norm = bool(config.get("norm_topk_prob", True))
    if norm != (topk > 1):
        raise config.refuse("norm_topk_prob", norm, f"megatron.core's sigmoid router renormalises the chosen "
                                                    f"experts' weights exactly when top-k > 1 (here {topk})")
    shared = config.int("n_shared_experts", 1)
    if shared != 1:
        raise config.refuse("n_shared_experts", shared, "megatron.core builds one shared expert")
    fields = dict(num_moe_experts=config.int("n_routed_experts"), moe_router_topk=topk,
                  moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                  moe_router_topk_scaling_factor=float(config.get("routed_scaling_factor", 1.0)),
                  moe_ffn_hidden_size=config.int("moe_intermediate_size"),
                  moe_shared_expert_intermediate_size=config.int("moe_shared_expert_intermediate_size"))
    groups, group_topk = config.int("n_group", 1), config.int("topk_group", 1)
    if groups > 1:
        if topk % group_topk or topk // group_topk != 2:
            raise config.refuse("topk_group", group_topk,
                                f"NemotronH ranks expert groups by their top-2 scores and megatron.core by their "
                                f"top-(num_experts_per_tok / topk_group), which is {topk / group_topk:g} here")
        fields.update(moe_router_num_groups=groups, moe_router_group_topk=group_topk)
    return fields


def nemotron_h_fields(config: HFConfig) -> dict:
    """The recipe's architecture fields of a ``NemotronHForCausalLM`` config."""
    _refuse_unsupported(config)
    pattern = layer_pattern(config)
    epsilon = float(config.get("layer_norm_epsilon", MAMBA_NORM_EPS))
    if "M" in pattern and epsilon != MAMBA_NORM_EPS:
        raise config.refuse("layer_norm_epsilon", epsilon, f"megatron.core's Mamba mixers normalise their gate "
                                                           f"with epsilon {MAMBA_NORM_EPS}, NemotronH with this one")
    hidden, heads = config.int("hidden_size"), config.int("num_attention_heads")
    head_dim = config.int("head_dim", hidden // heads)
    fields = dict(
        num_layers=len(pattern), hybrid_layer_pattern=pattern, hidden_size=hidden,
        ffn_hidden_size=config.int("intermediate_size"), num_attention_heads=heads,
        num_query_groups=config.int("num_key_value_heads", heads),
        kv_channels=None if head_dim * heads == hidden else head_dim,
        vocab_size=config.int("vocab_size"),
        seq_length=min(config.int("max_position_embeddings", DEFAULT_SEQ_LENGTH), DEFAULT_SEQ_LENGTH),
        normalization="RMSNorm", norm_epsilon=epsilon, activation="squared_relu", position_embedding_type="none",
        share_embeddings_and_output_weights=bool(config.get("tie_word_embeddings", False)),
        mamba_state_dim=config.int("ssm_state_size"), mamba_head_dim=config.int("mamba_head_dim"),
        mamba_num_groups=config.int("n_groups"), mamba_num_heads=config.int("mamba_num_heads"),
    )
    if "E" in pattern:
        fields.update(_routing_fields(config))
    return fields


NEMOTRON_H = register(Family(name="nemotron_h", architectures=("NemotronHForCausalLM",), model_types=("nemotron_h",),
                             model_fields=nemotron_h_fields))
