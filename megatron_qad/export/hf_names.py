"""Megatron GPT tensor names -> Hugging Face (Llama / Qwen2 / Qwen2-MoE style) names and row splits.

A Megatron tensor maps to one or more HF tensors, each a contiguous range of its rows (dim 0):

================================================  ==============================================
Megatron (bare GPTModel, TP=1)                    Hugging Face
================================================  ==============================================
embedding.word_embeddings.weight                  model.embed_tokens.weight
decoder.layers.i.input_layernorm.weight           model.layers.i.input_layernorm.weight
decoder.layers.i.self_attention.linear_qkv.*      model.layers.i.self_attn.{q,k,v}_proj.* (split)
decoder.layers.i.self_attention.linear_proj.*     model.layers.i.self_attn.o_proj.*
decoder.layers.i.self_attention.core_attention    model.layers.i.self_attn.{k,v}_scale
decoder.layers.i.pre_mlp_layernorm.weight         model.layers.i.post_attention_layernorm.weight
decoder.layers.i.mlp.linear_fc1.* (gated)         model.layers.i.mlp.{gate,up}_proj.* (halves)
decoder.layers.i.mlp.linear_fc2.*                 model.layers.i.mlp.down_proj.*
decoder.layers.i.mlp.router.weight                model.layers.i.mlp.gate.weight
...mlp.experts.local_experts.e.linear_fc{1,2}.*   model.layers.i.mlp.experts.e.{gate,up,down}_proj.*
...mlp.shared_experts.linear_fc{1,2}.*            model.layers.i.mlp.shared_expert.{gate,up,down}_proj.*
decoder.final_layernorm.weight                    model.norm.weight
output_layer.weight                               lm_head.weight
================================================  ==============================================

Megatron's fused QKV holds, for each of the ``num_query_groups`` groups in turn, that group's
query heads, then its key head, then its value head (``head_dim`` rows each); a gated MLP's fc1 is
``[gate; up]``. Row splits apply alike to a weight, its bias, its packed NVFP4 codes and its
per-block scales (blocks run along the columns).
"""

import re
from dataclasses import dataclass

from ..config import ConfigError, ModelConfig


@dataclass(frozen=True)
class Piece:
    """HF module ``name`` takes rows ``rows`` (a slice) of the Megatron tensor, grouped per query
    group when ``per_group`` (QKV: the slice is within each group's row block)."""

    name: str
    rows: slice
    per_group: bool = False


def _mlp_pieces(prefix: str, layer: str, gated: bool, ffn: int) -> dict[str, list[Piece]]:
    fc1 = ([Piece(f"{prefix}.gate_proj", slice(0, ffn)), Piece(f"{prefix}.up_proj", slice(ffn, 2 * ffn))]
           if gated else [Piece(f"{prefix}.up_proj", slice(None))])
    return {f"{layer}.linear_fc1": fc1, f"{layer}.linear_fc2": [Piece(f"{prefix}.down_proj", slice(None))]}


def module_map(model_cfg: ModelConfig) -> dict[str, list[Piece]]:
    """Megatron module name (without ``.weight``) -> its HF pieces, for every linear module and
    core attention (K / V scales) of a GPT model of ``model_cfg``."""
    if model_cfg.is_hybrid:
        raise ConfigError(f"'model.hybrid_layer_pattern' is {model_cfg.hybrid_layer_pattern!r}: exporting hybrid "
                          f"(Mamba) models is not available yet; GPT models (Llama, Qwen2, Qwen2-MoE) export")
    d = model_cfg.kv_channels or model_cfg.hidden_size // model_cfg.num_attention_heads
    per_group = model_cfg.num_attention_heads // model_cfg.num_query_groups
    gated = model_cfg.activation == "swiglu"
    pieces: dict[str, list[Piece]] = {"output_layer": [Piece("lm_head", slice(None))]}
    for i in range(model_cfg.num_layers):
        m, h = f"decoder.layers.{i}", f"model.layers.{i}"
        pieces[f"{m}.self_attention.linear_qkv"] = [
            Piece(f"{h}.self_attn.q_proj", slice(0, per_group * d), per_group=True),
            Piece(f"{h}.self_attn.k_proj", slice(per_group * d, (per_group + 1) * d), per_group=True),
            Piece(f"{h}.self_attn.v_proj", slice((per_group + 1) * d, (per_group + 2) * d), per_group=True)]
        pieces[f"{m}.self_attention.linear_proj"] = [Piece(f"{h}.self_attn.o_proj", slice(None))]
        pieces[f"{m}.self_attention.core_attention"] = [Piece(f"{h}.self_attn", slice(None))]
        if not model_cfg.is_moe:
            pieces.update(_mlp_pieces(f"{h}.mlp", f"{m}.mlp", gated, model_cfg.ffn_hidden_size))
            continue
        for e in range(model_cfg.num_moe_experts):
            pieces.update(_mlp_pieces(f"{h}.mlp.experts.{e}", f"{m}.mlp.experts.local_experts.{e}", gated,
                                      model_cfg.expert_ffn_hidden_size))
        if model_cfg.moe_shared_expert_intermediate_size:
            pieces.update(_mlp_pieces(f"{h}.mlp.shared_expert", f"{m}.mlp.shared_experts", gated,
                                      model_cfg.moe_shared_expert_intermediate_size))
    return pieces


_PLAIN = ((r"^embedding\.word_embeddings\.weight$", "model.embed_tokens.weight"),
          (r"^decoder\.layers\.(\d+)\.input_layernorm\.weight$", r"model.layers.\1.input_layernorm.weight"),
          (r"^decoder\.layers\.(\d+)\.pre_mlp_layernorm\.weight$", r"model.layers.\1.post_attention_layernorm.weight"),
          (r"^decoder\.layers\.(\d+)\.mlp\.router\.weight$", r"model.layers.\1.mlp.gate.weight"),
          (r"^decoder\.final_layernorm\.weight$", "model.norm.weight"))


def plain_name(name: str) -> str | None:
    """The HF name of a Megatron parameter that is not part of a linear module (embedding, norms,
    router), or None."""
    for pattern, replacement in _PLAIN:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    return None


def take_rows(tensor, piece: Piece, num_query_groups: int):
    """The rows of ``tensor`` (dim 0) that ``piece`` names (a contiguous copy)."""
    if not piece.per_group:
        return tensor[piece.rows].contiguous()
    grouped = tensor.reshape(num_query_groups, -1, *tensor.shape[1:])
    return grouped[:, piece.rows].reshape(-1, *tensor.shape[1:]).contiguous()


def hf_config(model_cfg: ModelConfig) -> dict:
    """``config.json`` of the exported model (Llama, Qwen2 when the QKV projection has biases, or
    Qwen2-MoE names for mixture-of-experts models)."""
    d = model_cfg.kv_channels or model_cfg.hidden_size // model_cfg.num_attention_heads
    activation = {"swiglu": "silu", "gelu": "gelu", "squared_relu": "relu2"}[model_cfg.activation]
    config = {
        "hidden_size": model_cfg.hidden_size, "intermediate_size": model_cfg.ffn_hidden_size,
        "num_hidden_layers": model_cfg.num_layers, "num_attention_heads": model_cfg.num_attention_heads,
        "num_key_value_heads": model_cfg.num_query_groups, "head_dim": d, "vocab_size": model_cfg.vocab_size,
        "max_position_embeddings": model_cfg.seq_length, "rope_theta": float(model_cfg.rotary_base),
        "rms_norm_eps": 1e-5, "hidden_act": activation, "tie_word_embeddings":
            model_cfg.share_embeddings_and_output_weights, "torch_dtype": "bfloat16",
    }
    if model_cfg.is_moe:
        config.update(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe",
                      num_experts=model_cfg.num_moe_experts, num_experts_per_tok=model_cfg.moe_router_topk,
                      moe_intermediate_size=model_cfg.expert_ffn_hidden_size,
                      shared_expert_intermediate_size=model_cfg.moe_shared_expert_intermediate_size,
                      norm_topk_prob=False)
    elif model_cfg.add_qkv_bias:
        config.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    else:
        config.update(architectures=["LlamaForCausalLM"], model_type="llama",
                      attention_bias=model_cfg.add_bias_linear)
    return config
