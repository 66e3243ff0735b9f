"""Megatron tensor names -> Hugging Face names and row splits: GPT models in Llama / Qwen2 /
Qwen2-MoE names, hybrid (Mamba) models in Nemotron-H names. ``megatron-qad import`` reads the same
table backwards (:func:`hf_sources`, :func:`put_rows`).

A Megatron tensor maps to one or more HF tensors, each a contiguous range of its rows (dim 0).

GPT models:

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
...mlp.shared_experts.gate_weight                 model.layers.i.mlp.shared_expert_gate.weight
(no gate: zeros, and down_proj doubled)           model.layers.i.mlp.shared_expert_gate.weight
decoder.final_layernorm.weight                    model.norm.weight
output_layer.weight                               lm_head.weight (none when tied: see below)
================================================  ==============================================

A model sharing its embedding with the output layer (``model.share_embeddings_and_output_weights``)
has no ``output_layer.weight``: its export holds ``model.embed_tokens.weight`` only and says
``tie_word_embeddings: true``, which Hugging Face's Llama and Qwen2 classes tie to ``lm_head``.

GPT-MoE models are written as ``Qwen2MoeForCausalLM`` checkpoints, which route and combine as
megatron.core's softmax router does (see :func:`_qwen2_moe_keys`): Qwen2-MoE takes the top-k of
softmax(logits) over all experts and, with ``norm_topk_prob``, renormalises them to sum 1, which
is megatron.core's softmax over the top-k logits (its default, ``moe_router_pre_softmax`` false);
without ``norm_topk_prob`` it is megatron.core's pre-softmax routing (softmax over all experts,
no renormalisation). Its shared expert's output is always scaled by
``sigmoid(shared_expert_gate(x))``, megatron.core's ``SharedExpertMLP`` gate
(``sigmoid(x @ gate_weight.T)``, ``model.moe_shared_expert_gate``); a shared expert without the
gate is written with a zero gate (sigmoid 0 = 1/2) and its down_proj doubled, which is exact.
Routers that compute anything else are refused (ConfigError) rather than exported to route differently.

Hybrid models (``model.hybrid_layer_pattern``) are written as ``NemotronHForCausalLM`` checkpoints
(model_type "nemotron_h"), with the names of NVIDIA's Nemotron-H / Nemotron 3 Nano checkpoints on
the Hugging Face Hub: layer i is ``backbone.layers.i``, its pre-norm ``norm`` and its ``mixer``
(the Mamba mixer, the attention, the MLP or the MoE layer of pattern symbol M, *, - or E):

==========================================================  =================================================
Megatron (bare HybridModel, TP=1)                           Hugging Face (H = backbone.layers.i)
==========================================================  =================================================
embedding.word_embeddings.weight                            backbone.embeddings.weight
decoder.layers.i.{norm,input_layernorm,pre_mlp_layernorm}   H.norm.weight
M decoder.layers.i.mixer.{in_proj,out_proj}.*               H.mixer.{in_proj,out_proj}.*
M decoder.layers.i.mixer.conv1d_{weight,bias}               H.mixer.conv1d.{weight,bias}
M decoder.layers.i.mixer.{A_log,D,dt_bias,norm.weight}      H.mixer.{A_log,D,dt_bias,norm.weight}
* decoder.layers.i.self_attention.linear_qkv.*              H.mixer.{q,k,v}_proj.* (split)
* decoder.layers.i.self_attention.linear_proj.*             H.mixer.o_proj.*
* decoder.layers.i.self_attention.core_attention            H.mixer.{k,v}_scale
- decoder.layers.i.mlp.linear_fc{1,2}.*                     H.mixer.{up,down}_proj.*
E decoder.layers.i.mlp.router.weight                        H.mixer.gate.weight
E decoder.layers.i.mlp.router.expert_bias                   H.mixer.gate.e_score_correction_bias
E ...mlp.experts.local_experts.e.linear_fc{1,2}.*           H.mixer.experts.e.{up,down}_proj.*
E ...mlp.shared_experts.linear_fc{1,2}.*                    H.mixer.shared_experts.{up,down}_proj.*
decoder.final_norm.weight                                   backbone.norm_f.weight
output_layer.weight                                         lm_head.weight
==========================================================  =================================================

Megatron's Mamba tensors at TP=1 already have the HF layout, so they map whole: ``in_proj`` rows
are [z | x | B | C | dt] (d_inner, d_inner, groups x state, groups x state, heads rows), the order in
which ``NemotronHMamba2Mixer`` splits its projection; ``conv1d`` is [d_inner + 2 x groups x state,
1, kernel] over the [x | B | C] channels (an ``nn.Conv1d`` weight with one channel per group);
``A_log``, ``D``, ``dt_bias`` are [heads]; the gated norm's weight is [d_inner], normalised in
``groups`` groups, after the gate, on both sides. (A TP-sharded checkpoint interleaves the
components per rank, but export loads the student at TP=1, where dist checkpointing reassembles
them.) Transformers' own ``nemotron_h`` class loads these names through its checkpoint conversion
mapping ("backbone." -> "model.", per-expert ``up_proj`` / ``down_proj`` stacked into 3-D tensors).

Megatron's fused QKV holds, for each of the ``num_query_groups`` groups in turn, that group's
query heads, then its key head, then its value head (``head_dim`` rows each); a gated MLP's fc1 is
``[gate; up]``. Row splits apply alike to a weight, its bias, its packed NVFP4 codes and its
per-block scales (blocks run along the columns).
"""

import re
from dataclasses import dataclass

import torch

from megatron.core.transformer import TransformerConfig

from ..config import ConfigError, ModelConfig

MAMBA_CONV_KERNEL = 4
"""Width of the Mamba mixers' causal convolution: megatron.core ``MambaMixer``'s ``d_conv``
default, which the recipe does not set."""
MAMBA_CHUNK_SIZE = 128
"""Chunk length of the Mamba2 SSD scan: megatron.core ``MambaMixer``'s ``chunk_size`` default."""
MAMBA_NORM_EPS = 1e-5
"""Epsilon of the Mamba mixers' gated norm (megatron.core ``MambaMixer`` fixes it; the other norms
use ``model.norm_epsilon``). Nemotron-H uses ``layer_norm_epsilon`` for all of them."""
LLAMA3_ROPE_SCALING = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}
"""Llama 3.1's RoPE frequency scaling as megatron.core applies it with ``rope_scaling`` (these
constants; the factor is ``model.rope_scaling_factor``), in ``config.json``'s ``rope_scaling`` keys."""
_NON_GATED_ACTIVATIONS = {"squared_relu": "relu2", "gelu": "gelu"}
"""HF names of the MLP activations a Nemotron-H MLP (``up_proj`` -> act -> ``down_proj``) can have."""


@dataclass(frozen=True)
class Piece:
    """HF module ``name`` takes rows ``rows`` (a slice; all by default) of the Megatron tensor,
    grouped per query group when ``per_group`` (QKV: the slice is within each group's row block).
    ``output_scale``: the HF module computes this power of two times the Megatron module's output
    (its weight and bias scaled: exactly, in the NVFP4 tensor scale or the BF16 values).
    ``groups``: the query groups of this piece's attention layer where it has its own (a DeciLM
    block's ``n_heads_in_group``); None: the model's ``num_query_groups``."""

    name: str
    rows: slice = slice(None)
    per_group: bool = False
    output_scale: float = 1.0
    groups: int | None = None


def head_dim(model_cfg: ModelConfig) -> int:
    """The attention head size."""
    return model_cfg.kv_channels or model_cfg.hidden_size // model_cfg.num_attention_heads


def attention_pieces(megatron: str, hf: str, model_cfg: ModelConfig,
                     groups: int | None = None) -> dict[str, list[Piece]]:
    """The fused QKV (split per query group), output projection and core attention (K / V scales)
    of the Megatron attention module ``megatron``, as pieces of the HF attention module ``hf``;
    ``groups``: the layer's own query groups (None: the model's)."""
    d = head_dim(model_cfg)
    per_group = model_cfg.num_attention_heads // (groups or model_cfg.num_query_groups)
    return {
        f"{megatron}.linear_qkv": [
            Piece(f"{hf}.{name}_proj", slice(start * d, stop * d), per_group=True, groups=groups)
            for name, start, stop in (("q", 0, per_group), ("k", per_group, per_group + 1),
                                      ("v", per_group + 1, per_group + 2))],
        f"{megatron}.linear_proj": [Piece(f"{hf}.o_proj")],
        f"{megatron}.core_attention": [Piece(hf)],
    }


def mlp_pieces(megatron: str, hf: str, gated: bool, ffn: int) -> dict[str, list[Piece]]:
    """fc1 (``[gate; up]`` halves when ``gated``) and fc2 of the Megatron MLP ``megatron`` (width
    ``ffn``), as pieces of the HF MLP ``hf``."""
    fc1 = ([Piece(f"{hf}.gate_proj", slice(0, ffn)), Piece(f"{hf}.up_proj", slice(ffn, 2 * ffn))]
           if gated else [Piece(f"{hf}.up_proj")])
    return {f"{megatron}.linear_fc1": fc1, f"{megatron}.linear_fc2": [Piece(f"{hf}.down_proj")]}


def _moe_pieces(megatron: str, hf: str, shared_expert: str, gated: bool,
                model_cfg: ModelConfig) -> dict[str, list[Piece]]:
    """The routed experts and the shared expert (HF module ``<hf>.<shared_expert>``) of the Megatron
    MoE layer ``megatron``, as pieces of the HF MoE module ``hf``."""
    pieces = {}
    for e in range(model_cfg.num_moe_experts):
        pieces.update(mlp_pieces(f"{megatron}.experts.local_experts.{e}", f"{hf}.experts.{e}", gated,
                                 model_cfg.expert_ffn_hidden_size))
    if model_cfg.moe_shared_expert_intermediate_size:
        pieces.update(mlp_pieces(f"{megatron}.shared_experts", f"{hf}.{shared_expert}", gated,
                                 model_cfg.moe_shared_expert_intermediate_size))
    return pieces


def module_map(model_cfg: ModelConfig) -> dict[str, list[Piece]]:
    """Megatron module name (without ``.weight``) -> its HF pieces, for every linear module and
    core attention (K / V scales) of a model of ``model_cfg`` (GPT, or hybrid in Nemotron-H names).
    The names are the local spec's, which :func:`megatron_qad.export.export` builds for any student."""
    if model_cfg.is_hybrid:
        return _nemotron_h_module_map(model_cfg)
    return _gpt_module_map(model_cfg)


def _gpt_module_map(model_cfg: ModelConfig) -> dict[str, list[Piece]]:
    if model_cfg.is_moe:
        _check_qwen2_moe_layout(model_cfg)
    gated = model_cfg.activation == "swiglu"
    pieces: dict[str, list[Piece]] = {"output_layer": [Piece("lm_head")]}
    for i in range(model_cfg.num_layers):
        m, h = f"decoder.layers.{i}", f"model.layers.{i}"
        pieces.update(attention_pieces(f"{m}.self_attention", f"{h}.self_attn", model_cfg))
        if model_cfg.is_moe:
            pieces.update(_moe_pieces(f"{m}.mlp", f"{h}.mlp", "shared_expert", gated, model_cfg))
            if ungated_shared_expert(model_cfg):
                # HF scales the shared expert by sigmoid(shared_expert_gate(x)); a zero gate weight
                # (constant_tensors) makes that 1/2, and a doubled down_proj undoes it exactly.
                pieces[f"{m}.mlp.shared_experts.linear_fc2"] = [
                    Piece(f"{h}.mlp.shared_expert.down_proj", output_scale=2.0)]
        else:
            pieces.update(mlp_pieces(f"{m}.mlp", f"{h}.mlp", gated, model_cfg.ffn_hidden_size))
    return pieces


def ungated_shared_expert(model_cfg: ModelConfig) -> bool:
    """Whether a GPT-MoE model's shared expert has no gate (``model.moe_shared_expert_gate`` false),
    which its Qwen2-MoE export expresses with a zero ``shared_expert_gate`` and a doubled down_proj."""
    return (not model_cfg.is_hybrid and model_cfg.is_moe and bool(model_cfg.moe_shared_expert_intermediate_size)
            and not model_cfg.moe_shared_expert_gate)


def constant_tensors(model_cfg: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF tensors with no Megatron counterpart: the zero ``shared_expert_gate.weight`` [1, hidden]
    of each layer of a GPT-MoE model whose shared expert has no gate (see :func:`ungated_shared_expert`),
    and the zero ``e_score_correction_bias`` (float32 [experts]) of each Nemotron-H MoE layer whose
    router has no expert bias (``model.moe_router_enable_expert_bias`` false): NemotronH's router
    always adds one, and an engine that finds none in the checkpoint may leave it uninitialised."""
    if model_cfg.is_hybrid and model_cfg.is_moe and not model_cfg.moe_router_enable_expert_bias:
        return {f"backbone.layers.{i}.mixer.gate.e_score_correction_bias":
                torch.zeros(model_cfg.num_moe_experts, dtype=torch.float32)
                for i, symbol in enumerate(model_cfg.hybrid_layer_symbols) if symbol == "E"}
    if not ungated_shared_expert(model_cfg):
        return {}
    return {f"model.layers.{i}.mlp.shared_expert_gate.weight": torch.zeros(1, model_cfg.hidden_size, dtype=dtype)
            for i in range(model_cfg.num_layers)}


def other_linears(model_cfg: ModelConfig) -> list[str]:
    """HF names of the linear maps of the exported model that are no quantizable linear here,
    written whole in the export dtype: the MoE routers (``mlp.gate``, ``mixer.gate``) and
    Qwen2-MoE's ``shared_expert_gate``. A reader that quantizes every ``Linear`` not ignored must
    skip them (engines build routers as linear layers; llm-compressor's NVFP4 MoE checkpoints
    ignore them too)."""
    if not model_cfg.is_moe:
        return []
    if model_cfg.is_hybrid:
        return [f"backbone.layers.{i}.mixer.gate" for i, s in enumerate(model_cfg.hybrid_layer_symbols) if s == "E"]
    names = [f"model.layers.{i}.mlp.gate" for i in range(model_cfg.num_layers)]
    if model_cfg.moe_shared_expert_intermediate_size:
        names += [f"model.layers.{i}.mlp.shared_expert_gate" for i in range(model_cfg.num_layers)]
    return names


def _nemotron_h_module_map(model_cfg: ModelConfig) -> dict[str, list[Piece]]:
    _check_nemotron_h_layout(model_cfg)
    pieces: dict[str, list[Piece]] = {"output_layer": [Piece("lm_head")]}
    for i, symbol in enumerate(model_cfg.hybrid_layer_symbols):
        m, mixer = f"decoder.layers.{i}", f"backbone.layers.{i}.mixer"
        if symbol == "M":
            pieces[f"{m}.mixer.in_proj"] = [Piece(f"{mixer}.in_proj")]
            pieces[f"{m}.mixer.out_proj"] = [Piece(f"{mixer}.out_proj")]
        elif symbol == "*":
            pieces.update(attention_pieces(f"{m}.self_attention", mixer, model_cfg))
        elif symbol == "-":
            pieces.update(mlp_pieces(f"{m}.mlp", mixer, False, model_cfg.ffn_hidden_size))
        else:  # "E"
            pieces.update(_moe_pieces(f"{m}.mlp", mixer, "shared_experts", False, model_cfg))
    return pieces


def _check_nemotron_h_layout(model_cfg: ModelConfig) -> None:
    """Raise ConfigError for a hybrid model that ``NemotronHForCausalLM`` cannot hold."""
    m = model_cfg
    symbols = m.hybrid_layer_symbols
    problems = []
    if m.normalization != "RMSNorm":
        problems.append(f"'model.normalization' is {m.normalization!r}, but Nemotron-H normalises with RMSNorm "
                        f"(no bias); set model.normalization=RMSNorm")
    if m.position_embedding_type != "none":
        problems.append(f"'model.position_embedding_type' is {m.position_embedding_type!r}, but Nemotron-H "
                        f"attention has no position embedding; set model.position_embedding_type=none")
    if m.add_bias_linear or m.add_qkv_bias:
        problems.append("'model.add_bias_linear' / 'model.add_qkv_bias' is true, but Nemotron-H projections "
                        "have no biases; set both to false")
    if "M" in symbols and m.norm_epsilon != MAMBA_NORM_EPS:
        problems.append(f"'model.norm_epsilon' is {m.norm_epsilon}, but Nemotron-H normalises its Mamba mixers' "
                        f"gates with the same epsilon and megatron.core's with {MAMBA_NORM_EPS}; set "
                        f"model.norm_epsilon={MAMBA_NORM_EPS}")
    if m.share_embeddings_and_output_weights:
        problems.append("'model.share_embeddings_and_output_weights' is true, but NemotronHForCausalLM has its "
                        "own lm_head; set it to false")
    if ("-" in symbols or "E" in symbols) and m.activation not in _NON_GATED_ACTIVATIONS:
        problems.append(f"'model.activation' is {m.activation!r}, but Nemotron-H MLPs and experts are not gated "
                        f"(up_proj, down_proj); use one of {sorted(_NON_GATED_ACTIVATIONS)} (squared_relu is "
                        f"Nemotron-H's relu2)")
    if "E" in symbols and not m.moe_shared_expert_intermediate_size:
        problems.append("'model.moe_shared_expert_intermediate_size' is 0, but every Nemotron-H MoE layer has "
                        "a shared expert (mixer.shared_experts); give the student one")
    if "E" in symbols and m.moe_shared_expert_gate:
        problems.append("'model.moe_shared_expert_gate' is true, but Nemotron-H shared experts have no gate "
                        "(their output is added unscaled); build the student with model.moe_shared_expert_gate=false")
    if problems:
        raise ConfigError(f"'model.hybrid_layer_pattern' is {m.hybrid_layer_pattern!r}: this hybrid model cannot "
                          f"be exported as a Hugging Face NemotronH checkpoint: " + "; ".join(problems))


_GPT_PLAIN = (
    (r"^embedding\.word_embeddings\.weight$", "model.embed_tokens.weight"),
    (r"^decoder\.layers\.(\d+)\.input_layernorm\.weight$", r"model.layers.\1.input_layernorm.weight"),
    (r"^decoder\.layers\.(\d+)\.pre_mlp_layernorm\.weight$", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"^decoder\.layers\.(\d+)\.mlp\.router\.weight$", r"model.layers.\1.mlp.gate.weight"),
    (r"^decoder\.layers\.(\d+)\.mlp\.shared_experts\.gate_weight$", r"model.layers.\1.mlp.shared_expert_gate.weight"),
    (r"^decoder\.final_layernorm\.weight$", "model.norm.weight"))
_NEMOTRON_H_PLAIN = (
    (r"^embedding\.word_embeddings\.weight$", "backbone.embeddings.weight"),
    (r"^decoder\.layers\.(\d+)\.(?:norm|input_layernorm|pre_mlp_layernorm)\.weight$",
     r"backbone.layers.\1.norm.weight"),
    (r"^decoder\.layers\.(\d+)\.mixer\.conv1d_(weight|bias)$", r"backbone.layers.\1.mixer.conv1d.\2"),
    (r"^decoder\.layers\.(\d+)\.mixer\.(A_log|D|dt_bias|norm\.weight)$", r"backbone.layers.\1.mixer.\2"),
    (r"^decoder\.layers\.(\d+)\.mlp\.router\.weight$", r"backbone.layers.\1.mixer.gate.weight"),
    (r"^decoder\.layers\.(\d+)\.mlp\.router\.expert_bias$", r"backbone.layers.\1.mixer.gate.e_score_correction_bias"),
    (r"^decoder\.final_norm\.weight$", "backbone.norm_f.weight"))


def plain_name(name: str, model_cfg: ModelConfig) -> str | None:
    """The HF name of a Megatron parameter or buffer that is not part of a linear module
    (embedding, norms, router and its expert bias, the shared experts' gate, the Mamba convolution
    and SSM parameters), or None."""
    for pattern, replacement in _NEMOTRON_H_PLAIN if model_cfg.is_hybrid else _GPT_PLAIN:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    return None


def take_rows(tensor, piece: Piece, num_query_groups: int):
    """The rows of ``tensor`` (dim 0) that ``piece`` names (a contiguous copy)."""
    if not piece.per_group:
        return tensor[piece.rows].contiguous()
    num_query_groups = piece.groups or num_query_groups
    grouped = tensor.reshape(num_query_groups, -1, *tensor.shape[1:])
    return grouped[:, piece.rows].reshape(-1, *tensor.shape[1:]).contiguous()


def piece_row_count(piece: Piece, rows: int, num_query_groups: int) -> int:
    """How many rows (dim 0) ``piece`` takes of a Megatron tensor with ``rows`` rows."""
    if not piece.per_group:
        return len(range(rows)[piece.rows])
    num_query_groups = piece.groups or num_query_groups
    return num_query_groups * len(range(rows // num_query_groups)[piece.rows])


def put_rows(tensor: torch.Tensor, piece: Piece, num_query_groups: int, value: torch.Tensor) -> None:
    """Write ``value`` (the HF tensor of ``piece``) into the rows of ``tensor`` that ``piece`` names,
    divided by ``piece.output_scale``: the inverse of :func:`take_rows`, in place."""
    value = value.to(tensor.dtype) / piece.output_scale if piece.output_scale != 1.0 else value
    if not piece.per_group:
        tensor[piece.rows].copy_(value)
        return
    num_query_groups = piece.groups or num_query_groups
    grouped = tensor.view(num_query_groups, -1, *tensor.shape[1:])
    grouped[:, piece.rows].copy_(value.reshape(num_query_groups, -1, *value.shape[1:]))


def hf_sources(model_cfg: ModelConfig, names, modules: dict[str, list[Piece]] | None = None
               ) -> dict[str, list[tuple[str, Piece]]]:
    """The export's table read backwards: {Megatron tensor name: [(HF tensor name, the rows of the
    Megatron tensor it fills)]} for each of ``names`` (a bare TP=1 model's state-dict names) that
    has HF counterparts: linear weights and biases from ``modules`` (default :func:`module_map`),
    the rest from :func:`plain_name` (whole tensors). Names without an entry have none."""
    modules = module_map(model_cfg) if modules is None else modules
    sources = {}
    for name in names:
        module, _, leaf = name.rpartition(".")
        if module in modules and leaf in ("weight", "bias"):
            sources[name] = [(f"{piece.name}.{leaf}", piece) for piece in modules[module]]
        elif (hf_name := plain_name(name, model_cfg)) is not None:
            sources[name] = [(hf_name, Piece(hf_name))]
    return sources


def hf_config(model_cfg: ModelConfig, megatron_config: TransformerConfig) -> dict:
    """``config.json`` of the exported model: Nemotron-H for hybrid models, else Llama, Qwen2 (QKV
    biases) or Qwen2-MoE. ``megatron_config``: the student's megatron.core ``TransformerConfig``,
    whose MoE routing settings (from the recipe's ``model.moe_router_*``) decide the Nemotron-H and
    Qwen2-MoE routing keys. Raises ConfigError for a model the target architecture cannot hold."""
    if model_cfg.heterogeneous_layers_config is not None:
        raise ConfigError("'model.heterogeneous_layers_config' is set: this DeciLM model's blocks cannot be "
                          "exported yet (the export writes Llama, Qwen2, Qwen2-MoE and Nemotron-H "
                          "checkpoints, whose layers are all alike)")
    if model_cfg.is_hybrid:
        return _nemotron_h_config(model_cfg, megatron_config)
    return _gpt_config(model_cfg, megatron_config)


def _gpt_config(model_cfg: ModelConfig, megatron_config: TransformerConfig) -> dict:
    activation = {"swiglu": "silu", "gelu": "gelu", "squared_relu": "relu2"}[model_cfg.activation]
    config = {
        "hidden_size": model_cfg.hidden_size, "intermediate_size": model_cfg.ffn_hidden_size,
        "num_hidden_layers": model_cfg.num_layers, "num_attention_heads": model_cfg.num_attention_heads,
        "num_key_value_heads": model_cfg.num_query_groups, "head_dim": head_dim(model_cfg),
        "vocab_size": model_cfg.vocab_size, "max_position_embeddings": model_cfg.seq_length,
        "rope_theta": float(model_cfg.rotary_base), "rms_norm_eps": model_cfg.norm_epsilon, "hidden_act": activation,
        "tie_word_embeddings": model_cfg.share_embeddings_and_output_weights, "torch_dtype": "bfloat16",
    }
    if model_cfg.rope_scaling:
        config["rope_scaling"] = {**LLAMA3_ROPE_SCALING, "factor": float(model_cfg.rope_scaling_factor)}
    if model_cfg.is_moe:
        config.update(_qwen2_moe_keys(model_cfg, megatron_config))
    elif model_cfg.add_qkv_bias:
        config.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    else:
        config.update(architectures=["LlamaForCausalLM"], model_type="llama",
                      attention_bias=model_cfg.add_bias_linear)
    return config


def _check_qwen2_moe_layout(model_cfg: ModelConfig) -> None:
    """Raise ConfigError for a GPT-MoE model whose layers ``Qwen2MoeForCausalLM`` cannot hold."""
    m = model_cfg
    problems = []
    if m.activation != "swiglu":
        problems.append(f"'model.activation' is {m.activation!r}, but Qwen2-MoE experts are gated SiLU MLPs "
                        f"(gate_proj, up_proj, down_proj); set model.activation=swiglu")
    if m.add_bias_linear:
        problems.append("'model.add_bias_linear' is true, but the Qwen2-MoE router, experts and output "
                        "projection have no biases; set it to false (model.add_qkv_bias gives QKV biases)")
    if problems:
        raise ConfigError(f"'model.num_moe_experts' is {m.num_moe_experts}: this GPT-MoE model cannot be exported "
                          f"as a Hugging Face Qwen2-MoE checkpoint: " + "; ".join(problems))


def _qwen2_moe_keys(model_cfg: ModelConfig, megatron_config: TransformerConfig) -> dict:
    """The Qwen2-MoE keys of a GPT-MoE config. Qwen2-MoE routes by softmax(logits) over all
    experts, takes the top-k and, with ``norm_topk_prob``, divides them by their sum: megatron.core's
    default softmax routing (softmax of the top-k logits) when true, its ``moe_router_pre_softmax``
    routing when false. Routers that score, scale or pick experts otherwise: ConfigError."""
    _check_qwen2_moe_layout(model_cfg)
    c = megatron_config
    problems = []
    if c.moe_router_score_function != "softmax":
        problems.append(f"'model.moe_router_score_function' is {c.moe_router_score_function!r}, but Qwen2-MoE "
                        f"routes by softmax scores; set model.moe_router_score_function=softmax")
    if c.moe_router_enable_expert_bias:
        problems.append("'model.moe_router_enable_expert_bias' is true, but a Qwen2-MoE router has no expert "
                        "bias; set it to false")
    if c.moe_router_topk_scaling_factor not in (None, 1.0):
        problems.append(f"'model.moe_router_topk_scaling_factor' is {c.moe_router_topk_scaling_factor}, but "
                        f"Qwen2-MoE does not scale its routing weights; set it to null")
    if c.moe_router_num_groups or c.moe_router_group_topk:
        problems.append(f"the routers pick experts by groups (megatron.core's moe_router_num_groups = "
                        f"{c.moe_router_num_groups}, moe_router_group_topk = {c.moe_router_group_topk}), but "
                        f"Qwen2-MoE takes the top-k over all experts; build the student without group-limited routing")
    balancing = c.moe_router_load_balancing_type
    balancing = [balancing] if isinstance(balancing, str) else list(balancing)
    for kind in ("sinkhorn", "quantile_balancing"):
        if kind in balancing:
            problems.append(f"the routers balance load by {kind!r} (megatron.core's moe_router_load_balancing_type), "
                            f"which changes which experts Qwen2-MoE's plain top-k would pick; use an auxiliary loss")
    if c.moe_expert_capacity_factor is not None:
        problems.append(f"the experts drop tokens above capacity (megatron.core's moe_expert_capacity_factor = "
                        f"{c.moe_expert_capacity_factor}), which Qwen2-MoE never does; build the student without it")
    if problems:
        raise ConfigError("the student's MoE routers cannot be exported as Hugging Face Qwen2-MoE routers, "
                          "which would route tokens differently: " + "; ".join(problems))
    m = model_cfg
    return {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
            "num_experts": m.num_moe_experts, "num_experts_per_tok": m.moe_router_topk,
            "moe_intermediate_size": m.expert_ffn_hidden_size,
            "shared_expert_intermediate_size": m.moe_shared_expert_intermediate_size,
            "norm_topk_prob": not c.moe_router_pre_softmax,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False,
            "qkv_bias": m.add_qkv_bias}


def _nemotron_h_config(model_cfg: ModelConfig, megatron_config: TransformerConfig) -> dict:
    """``NemotronHConfig`` keys (as its ``config.json`` spells them) of a hybrid model."""
    _check_nemotron_h_layout(model_cfg)
    m = model_cfg
    config = {
        "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h",
        "hybrid_override_pattern": m.hybrid_layer_symbols, "num_hidden_layers": m.num_layers,
        "hidden_size": m.hidden_size, "vocab_size": m.vocab_size, "max_position_embeddings": m.seq_length,
        "layer_norm_epsilon": m.norm_epsilon, "tie_word_embeddings": False, "use_bias": False,
        "residual_in_fp32": False, "torch_dtype": "bfloat16",
        # attention (*)
        "num_attention_heads": m.num_attention_heads, "num_key_value_heads": m.num_query_groups,
        "head_dim": head_dim(m), "attention_bias": False,
        # Mamba2 (M): inner width mamba_num_heads x mamba_head_dim
        "mamba_num_heads": m.mamba_heads, "mamba_head_dim": m.mamba_head_dim, "n_groups": m.mamba_num_groups,
        "ssm_state_size": m.mamba_state_dim, "conv_kernel": MAMBA_CONV_KERNEL, "chunk_size": MAMBA_CHUNK_SIZE,
        "use_conv_bias": True, "mamba_proj_bias": False, "mamba_hidden_act": "silu",
        # dense MLP (-) and experts (E); an activation without an HF name here means the model has
        # no MLP (_check_nemotron_h_layout), and the key is unused
        "intermediate_size": m.ffn_hidden_size, "mlp_bias": False,
        "mlp_hidden_act": _NON_GATED_ACTIVATIONS.get(m.activation, "relu2"),
    }
    if m.is_moe:
        config.update(_nemotron_h_routing(m, megatron_config))
    return config


def _nemotron_h_routing(model_cfg: ModelConfig, megatron_config: TransformerConfig) -> dict:
    """The MoE keys (E) of a Nemotron-H config. NemotronH routes like megatron.core's sigmoid
    router: top-k of sigmoid(logits) + e_score_correction_bias, weights sigmoid(logits) of the
    chosen experts, normalised to sum 1 when top-k > 1, times ``routed_scaling_factor``. A router
    that scores with softmax, or picks experts by groups, would route differently: ConfigError."""
    score_function = megatron_config.moe_router_score_function
    if score_function != "sigmoid":
        raise ConfigError(
            f"the student's MoE routers score experts with {score_function!r} (megatron.core's "
            f"moe_router_score_function), but Hugging Face NemotronH routes by sigmoid scores (plus "
            f"e_score_correction_bias), so the export would route tokens differently. Export students "
            f"trained with 'model.moe_router_score_function: sigmoid' (as Nemotron-H / Nemotron 3 Nano are)")
    if megatron_config.moe_router_num_groups:
        raise ConfigError("the student's MoE routers pick experts by groups (megatron.core's "
                          "moe_router_num_groups), which NemotronH's group scores do not reproduce; "
                          "build the student without group-limited routing to export it")
    return {"n_routed_experts": model_cfg.num_moe_experts, "num_experts_per_tok": model_cfg.moe_router_topk,
            "moe_intermediate_size": model_cfg.expert_ffn_hidden_size,
            "moe_shared_expert_intermediate_size": model_cfg.moe_shared_expert_intermediate_size,
            "n_shared_experts": 1, "norm_topk_prob": model_cfg.moe_router_topk > 1,
            "routed_scaling_factor": float(megatron_config.moe_router_topk_scaling_factor or 1.0),
            "n_group": 1, "topk_group": 1}
