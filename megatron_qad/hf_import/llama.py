"""Llama (``LlamaForCausalLM``, and fine-tunes that keep its architecture) and the GPT fields that
Qwen2 and Qwen2-MoE share with it.

A Llama decoder layer is megatron.core's GPT layer: RMSNorm, GQA self-attention with RoPE, RMSNorm,
SwiGLU MLP. Config fields that change the math, and their recipe fields:

=========================================  ==================================================
config.json                                model:
=========================================  ==================================================
hidden_size, intermediate_size             hidden_size, ffn_hidden_size
num_hidden_layers, vocab_size              num_layers, vocab_size
num_attention_heads, num_key_value_heads   num_attention_heads, num_query_groups
head_dim                                   kv_channels (null when hidden_size / heads)
rms_norm_eps                               norm_epsilon
rope_theta (rope_parameters.rope_theta)    rotary_base
rope_scaling rope_type llama3              rope_scaling, rope_scaling_factor (megatron.core's
                                           fixed low / high frequency factors 1 / 4 and original
                                           context 8192 only; other types refused)
attention_bias + mlp_bias (both or none)   add_bias_linear
tie_word_embeddings                        share_embeddings_and_output_weights
hidden_act silu                            activation swiglu (others refused)
=========================================  ==================================================
"""

from ..export.hf_names import LLAMA3_ROPE_SCALING
from .family import Family, HFConfig, register

DEFAULT_SEQ_LENGTH = 4096
"""``model.seq_length`` of an imported recipe: the training sequence length, at most this
(``max_position_embeddings`` when shorter); a base recipe's value wins."""


def gpt_fields(config: HFConfig, tie_default: bool = False) -> dict:
    """The recipe fields every Llama-like decoder shares (see the module table)."""
    hidden, heads = config.int("hidden_size"), config.int("num_attention_heads")
    head_dim = config.int("head_dim", hidden // heads)
    config.expect("hidden_act", ["silu"], "silu",
                  "the MLP is megatron.core's gated SiLU (swiglu) MLP; convert the model to another architecture")
    theta, scaling = config.rope()
    fields = dict(
        num_layers=config.int("num_hidden_layers"),
        hidden_size=hidden,
        ffn_hidden_size=config.int("intermediate_size"),
        num_attention_heads=heads,
        num_query_groups=config.int("num_key_value_heads", heads),
        kv_channels=None if head_dim * heads == hidden else head_dim,
        vocab_size=config.int("vocab_size"),
        seq_length=min(config.int("max_position_embeddings", DEFAULT_SEQ_LENGTH), DEFAULT_SEQ_LENGTH),
        normalization="RMSNorm",
        norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
        activation="swiglu",
        position_embedding_type="rope",
        rotary_base=_integer_theta(config, theta),
        share_embeddings_and_output_weights=bool(config.get("tie_word_embeddings", tie_default)),
    )
    fields.update(rope_scaling_fields(config, scaling))
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise config.refuse("partial_rotary_factor", config.get("partial_rotary_factor"),
                            "this importer maps rotary embeddings over the whole head (1.0) only")
    return fields


def _integer_theta(config: HFConfig, theta: float) -> int:
    if theta != int(theta):
        raise config.refuse("rope_theta", theta, "megatron.core's rotary_base is an integer")
    return int(theta)


def rope_scaling_fields(config: HFConfig, scaling: dict | None) -> dict:
    """``rope_scaling`` / ``rope_scaling_factor`` of a RoPE scaling (None: unscaled). megatron.core's
    GPTModel reproduces Llama 3.1's scaling with low / high frequency factors 1 / 4 and an original
    context of 8192 tokens, and nothing else (yarn, linear, dynamic, longrope...: refused)."""
    if scaling is None:
        return {}
    key = config.rope_key
    if scaling["rope_type"] != "llama3":
        raise config.refuse(key, scaling, f"megatron.core's GPTModel scales RoPE as Llama 3.1 does "
                                          f"(rope_type llama3) and no other way")
    for name, expected in LLAMA3_ROPE_SCALING.items():
        if name != "rope_type" and float(scaling.get(name, -1)) != expected:
            raise config.refuse(key, scaling, f"megatron.core's llama3 RoPE scaling fixes {name} = {expected}")
    return dict(rope_scaling=True, rope_scaling_factor=float(scaling["factor"]))


def linear_biases(config: HFConfig) -> dict:
    """``add_bias_linear`` from ``attention_bias`` and ``mlp_bias``: megatron.core gives every
    linear layer a bias or none (QKV-only biases are Qwen2's ``add_qkv_bias``)."""
    attention, mlp = bool(config.get("attention_bias", False)), bool(config.get("mlp_bias", False))
    if attention != mlp:
        key = "attention_bias" if attention else "mlp_bias"
        raise config.refuse(key, True, "megatron.core's add_bias_linear gives every linear layer a bias, so "
                                       "attention_bias and mlp_bias must be equal")
    return dict(add_bias_linear=attention)


def llama_fields(config: HFConfig) -> dict:
    """The recipe's architecture fields of a ``LlamaForCausalLM`` config (``pretraining_tp`` only
    slices the same products in HF's forward and is ignored)."""
    return {**gpt_fields(config), **linear_biases(config)}


LLAMA = register(Family(
    name="llama",
    architectures=("LlamaForCausalLM",),
    model_types=("llama",),
    model_fields=llama_fields,
    ignored_tensors=(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$",),
))
