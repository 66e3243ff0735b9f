"""DeciLM (``DeciLMForCausalLM``, model_type ``nemotron-nas``: Llama-3.3-Nemotron-Super-49B and its
NAS siblings): Llama's decoder layer with each block's parts chosen by ``block_configs`` (see
:mod:`megatron_qad.block_configs`).

The recipe's fields are Llama's (:func:`.llama.gpt_fields`). These configs leave
``intermediate_size`` and ``num_key_value_heads`` null, so ``ffn_hidden_size`` is the widest MLP
and ``num_query_groups`` the first attention block's groups: defaults the blocks override.
``heterogeneous_layers_config`` names the checkpoint's config.json, which the import copies beside
the dist checkpoint (``convert.BLOCKS_FILE``).

Tensors of block i, in the names of the published ``modeling_decilm.py`` (a part that is nothing
has no tensors, its norm included):

==========================================  ==========================================================
Megatron (``decoder.layers.i.``)            Hugging Face (``model.layers.i.``)
==========================================  ==========================================================
input_layernorm.weight                      input_layernorm.weight
self_attention.linear_qkv.weight            self_attn.{q,k,v}_proj.weight (split per the block's groups)
self_attention.linear_proj.weight           self_attn.o_proj.weight
self_attention.weight (linear replacement)  self_attn.linear_attn.weight
pre_mlp_layernorm.weight                    post_attention_layernorm.weight
mlp.linear_fc1.weight                       mlp.{gate,up}_proj.weight (halves of the block's width)
mlp.linear_fc2.weight                       mlp.down_proj.weight
mlp.weight (linear replacement)             mlp.linear_mlp.weight
==========================================  ==========================================================

Biases: the published models have none (``attention_bias`` / ``mlp_bias`` false); DeciLM's linear
replacements never have one while megatron.core's would with ``add_bias_linear``, so biases are refused.
"""

from ..block_configs import parse_blocks, read_blocks
from ..config import ModelConfig
from ..export.hf_names import Piece, attention_pieces, hf_sources, mlp_pieces
from .family import Family, HFConfig, register
from .llama import gpt_fields


def _sizes(num_layers: int, hidden_size: int, num_attention_heads: int, vocab_size: int) -> dict[str, int]:
    return dict(num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                vocab_size=vocab_size)


def decilm_fields(config: HFConfig) -> dict:
    """The recipe's architecture fields of a ``DeciLMForCausalLM`` config (see the module docstring)."""
    hidden, heads = config.integer("hidden_size"), config.integer("num_attention_heads")
    blocks = parse_blocks(config.data, _sizes(config.integer("num_hidden_layers"), hidden, heads,
                                              config.integer("vocab_size")), config.source)
    for key in ("attention_bias", "mlp_bias"):
        config.expect(key, [False], False, "DeciLM's linear replacements have no bias, and megatron.core gives "
                                           "every linear layer a bias or none")
    groups = next((block.num_query_groups for block in blocks if block.num_query_groups), heads)
    width = max((block.ffn_hidden_size for block in blocks if block.ffn_hidden_size), default=hidden)
    llama = HFConfig({**config.data, "intermediate_size": width, "num_key_value_heads": groups}, config.source)
    return {**gpt_fields(llama), "heterogeneous_layers_config": config.source}


def decilm_sources(model_cfg: ModelConfig, names) -> dict[str, list[tuple[str, Piece]]]:
    """{Megatron tensor name: [(HF tensor name, Piece)]} of a DeciLM model (the module table)."""
    blocks = read_blocks(model_cfg.heterogeneous_layers_config, _sizes(
        model_cfg.num_layers, model_cfg.hidden_size, model_cfg.num_attention_heads, model_cfg.vocab_size))
    modules: dict[str, list[Piece]] = {"output_layer": [Piece("lm_head")]}
    for i, block in enumerate(blocks):
        m, h = f"decoder.layers.{i}", f"model.layers.{i}"
        if block.attention == "full":
            modules.update(attention_pieces(f"{m}.self_attention", f"{h}.self_attn", model_cfg,
                                            block.num_query_groups))
        elif block.attention == "linear":
            modules[f"{m}.self_attention"] = [Piece(f"{h}.self_attn.linear_attn")]
        if block.ffn == "full":
            modules.update(mlp_pieces(f"{m}.mlp", f"{h}.mlp", True, block.ffn_hidden_size))
        elif block.ffn == "linear":
            modules[f"{m}.mlp"] = [Piece(f"{h}.mlp.linear_mlp")]
    return hf_sources(model_cfg, names, modules)


DECILM = register(Family(
    name="decilm",
    architectures=("DeciLMForCausalLM",),
    model_types=("nemotron-nas",),
    model_fields=decilm_fields,
    ignored_tensors=(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$",),
    tensor_sources=decilm_sources,
))
