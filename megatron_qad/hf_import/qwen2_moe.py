"""Qwen2-MoE (``Qwen2MoeForCausalLM``): Qwen2's attention and, in every layer, a MoE block of
``num_experts`` SwiGLU experts (width ``moe_intermediate_size``) plus a shared expert (width
``shared_expert_intermediate_size``) scaled by ``sigmoid(shared_expert_gate(x))``, which is
megatron.core's gated shared expert (``model.moe_shared_expert_gate``).

Routing: Qwen2-MoE takes the top-``num_experts_per_tok`` of softmax(router logits) over all experts.
With ``norm_topk_prob: true`` it renormalises them to sum 1, which is megatron.core's softmax router
with ``moe_router_pre_softmax: false`` (softmax over the top-k logits: the same weights); with
false it keeps them as they are, which is ``moe_router_pre_softmax: true``. Layers without experts
(``decoder_sparse_step`` > 1, ``mlp_only_layers``) and models without a shared expert are refused.
"""

from .family import Family, HFConfig, register
from .llama import gpt_fields
from .qwen2 import full_attention_only


def qwen2_moe_fields(config: HFConfig) -> dict:
    """The recipe's architecture fields of a ``Qwen2MoeForCausalLM`` config."""
    full_attention_only(config)
    every_layer = "megatron_qad builds a MoE block in every layer"
    config.expect("decoder_sparse_step", [1], 1, every_layer)
    if config.get("mlp_only_layers", []):
        raise config.refuse("mlp_only_layers", config.get("mlp_only_layers"), every_layer)
    shared = config.int("shared_expert_intermediate_size")
    if shared < 1:
        raise config.refuse("shared_expert_intermediate_size", shared,
                            "every Qwen2-MoE layer has a shared expert; megatron.core needs its width >= 1")
    return {**gpt_fields(config), "add_qkv_bias": bool(config.get("qkv_bias", True)),
            "num_moe_experts": config.int("num_experts"),
            "moe_router_topk": config.int("num_experts_per_tok"),
            "moe_router_score_function": "softmax",
            "moe_router_pre_softmax": not config.get("norm_topk_prob", False),
            "moe_ffn_hidden_size": config.int("moe_intermediate_size"),
            "moe_shared_expert_intermediate_size": shared,
            "moe_shared_expert_gate": True}


QWEN2_MOE = register(Family(name="qwen2_moe", architectures=("Qwen2MoeForCausalLM",), model_types=("qwen2_moe",),
                            model_fields=qwen2_moe_fields))
