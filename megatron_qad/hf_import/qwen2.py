"""Qwen2 (``Qwen2ForCausalLM``): Llama's layer with biases on the Q, K and V projections only
(``model.add_qkv_bias``), tied or untied embeddings (``tie_word_embeddings``), RMSNorm epsilon
``rms_norm_eps`` (1e-6 in the published models). Sliding-window attention
(``use_sliding_window: true``, or ``layer_types`` other than full attention) is refused."""

from .family import Family, HFConfig, register
from .llama import gpt_fields


def full_attention_only(config: HFConfig) -> None:
    """Refuse sliding-window attention, which megatron.core's GPT layers here do not build."""
    if config.get("use_sliding_window", False):
        raise config.refuse("use_sliding_window", True, "megatron_qad builds full causal attention in every layer")
    kinds = set(config.get("layer_types", ["full_attention"]))
    if kinds != {"full_attention"}:
        raise config.refuse("layer_types", sorted(kinds), "megatron_qad builds full causal attention in every layer")


def qwen2_fields(config: HFConfig) -> dict:
    """The recipe's architecture fields of a ``Qwen2ForCausalLM`` config."""
    full_attention_only(config)
    return {**gpt_fields(config), "add_qkv_bias": True}


QWEN2 = register(Family(name="qwen2", architectures=("Qwen2ForCausalLM",), model_types=("qwen2",),
                        model_fields=qwen2_fields))
