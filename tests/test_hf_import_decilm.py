"""``megatron-qad import`` of DeciLM checkpoints (``DeciLMForCausalLM``, Llama-Nemotron-Super).

transformers 5.24 has no DeciLM class, so the reference model is assembled from transformers' own
Llama modules as the published ``modeling_decilm.py`` assembles its blocks: a block's attention is a
``LlamaAttention`` with the block's K/V heads (``num_attention_heads / n_heads_in_group``), its FFN a
``LlamaMLP`` of the block's width, a linear replacement an ``nn.Linear(hidden, hidden, bias=False)``
named ``linear_attn`` / ``linear_mlp``, a part that is nothing has no module and no norm. Its state
dict, in the published names, is written as the checkpoint; the imported megatron.core model must
reproduce the reference's fp32 logits. CPU runtime: about 15 s.
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from decilm_helpers import BLOCKS, HEADS, HIDDEN, VOCAB
from distributed_helpers import single_process
from megatron_qad.block_configs import ffn_mult_to_intermediate_size
from megatron_qad.config import ModelConfig, load_config
from megatron_qad.hf_import import HFConfig, family_for, import_checkpoint

transformers = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import (LlamaAttention, LlamaMLP, LlamaRMSNorm,  # noqa: E402
                                                      LlamaRotaryEmbedding)

SEQ = 12
REL_TOL = 1e-5
"""Bound on max |megatron - reference| / max |reference| for fp32 logits, the import's target (as
in test_hf_import.py); measured 0 here (the same fp32 operations, bit for bit)."""
ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas", "hidden_act": "silu",
          "hidden_size": HIDDEN, "num_attention_heads": HEADS, "num_hidden_layers": len(BLOCKS), "vocab_size": VOCAB,
          "intermediate_size": None, "num_key_value_heads": None, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
          "max_position_embeddings": 64, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
          "torch_dtype": "float32", "block_configs": BLOCKS}


def llama_config(**sizes):
    config = transformers.LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, vocab_size=VOCAB,
                                      rms_norm_eps=CONFIG["rms_norm_eps"], rope_theta=CONFIG["rope_theta"],
                                      max_position_embeddings=CONFIG["max_position_embeddings"], **sizes)
    config._attn_implementation = "eager"
    return config


class LinearReplacement(torch.nn.Module):
    """DeciLM's linear replacement: one bias-free hidden x hidden linear layer named ``name``."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        setattr(self, name, torch.nn.Linear(HIDDEN, HIDDEN, bias=False))

    def forward(self, x, **_):
        return getattr(self, self.name)(x)


class Block(torch.nn.Module):
    def __init__(self, block: dict, index: int):
        super().__init__()
        attention, ffn = block["attention"], block["ffn"]
        if not attention["no_op"]:
            self.input_layernorm = LlamaRMSNorm(HIDDEN, CONFIG["rms_norm_eps"])
            self.self_attn = (LinearReplacement("linear_attn") if attention["replace_with_linear"] else LlamaAttention(
                llama_config(num_key_value_heads=HEADS // attention["n_heads_in_group"]), index))
        if not ffn["no_op"]:
            self.post_attention_layernorm = LlamaRMSNorm(HIDDEN, CONFIG["rms_norm_eps"])
            self.mlp = (LinearReplacement("linear_mlp") if ffn["replace_with_linear"] else LlamaMLP(
                llama_config(intermediate_size=ffn_mult_to_intermediate_size(ffn["ffn_mult"], HIDDEN))))

    def forward(self, x, position_embeddings, mask):
        if hasattr(self, "self_attn"):
            out = self.self_attn(self.input_layernorm(x), position_embeddings=position_embeddings, attention_mask=mask)
            x = x + (out[0] if isinstance(out, tuple) else out)
        if hasattr(self, "mlp"):
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class ReferenceDeciLM(torch.nn.Module):
    """DeciLM's forward; ``state_dict()`` holds the published checkpoint names."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(VOCAB, HIDDEN)
        self.model.layers = torch.nn.ModuleList(Block(block, i) for i, block in enumerate(BLOCKS))
        self.model.norm = LlamaRMSNorm(HIDDEN, CONFIG["rms_norm_eps"])
        self.lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
        self.rotary = LlamaRotaryEmbedding(llama_config())  # its inv_freq is not in the state dict

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(ids)
        position_embeddings = self.rotary(x, torch.arange(ids.shape[1])[None].expand_as(ids))
        mask = torch.full((ids.shape[1],) * 2, float("-inf")).triu(1)[None, None]
        for layer in self.model.layers:
            x = layer(x, position_embeddings, mask)
        return self.lm_head(self.model.norm(x))


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter redrawn: N(0, 0.1), norms 1 + N(0, 0.1), so no wrong mapping hides behind ones."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.1
            param.copy_(1 + noise if name.endswith("norm.weight") else noise)
    return model.eval()


def test_imported_decilm_reproduces_the_reference_logits(tmp_path):
    reference = randomized(ReferenceDeciLM())
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(CONFIG))
    save_file(reference.state_dict(), hf_dir / "model.safetensors")
    result = import_checkpoint(hf_dir, tmp_path / "out", params_dtype="float32")
    assert result.family == "decilm"
    assert json.loads(Path(result.model.heterogeneous_layers_config).read_text()) == CONFIG
    assert Path(result.model.heterogeneous_layers_config).parent == tmp_path / "out"

    from megatron_qad.models import build_model, causal_attention_mask
    from megatron_qad.train.checkpointing import load_model

    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    config = load_config(result.model_yaml, [f"model.seq_length={SEQ}"])
    with single_process(config.parallel):
        model = build_model(config.model, config.parallel).eval()
        load_model([model], result.directory)
        with torch.no_grad():
            ours = model(ids, torch.arange(SEQ).expand(2, -1), causal_attention_mask(SEQ))
    with torch.no_grad():
        expected = reference(ids)
    error = ((ours - expected).abs().max() / expected.abs().max()).item()
    print(f"DeciLM: max |megatron - reference| / max |reference| = {error:.2e}")
    assert error < REL_TOL


def test_published_super_49b_config_gives_the_recipes_model(monkeypatch):
    """Llama-3.3-Nemotron-Super-49B-v1's config.json (its block_configs are the recipe's block file)
    gives the recipe's model field for field (sequence length and dtype are choices of the run)."""
    blocks_file = "configs/llama_nemotron_super_49b.blocks.json"
    published = {**json.loads((ROOT / blocks_file).read_text()), "hidden_act": "silu", "rms_norm_eps": 1e-05,
                 "rope_theta": 500000.0, "max_position_embeddings": 131072, "intermediate_size": None,
                 "num_key_value_heads": None, "attention_bias": False, "mlp_bias": False,
                 "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                 "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                  "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    config = HFConfig(published, blocks_file)
    fields = family_for(config).model_fields(config)
    monkeypatch.chdir(ROOT)  # the recipe's paths start at the repository root
    ours = load_config(ROOT / "configs" / "llama_nemotron_super_49b.yaml").model
    derived = dataclasses.replace(ours, **fields)
    for f in dataclasses.fields(ModelConfig):
        if f.name not in ("seq_length", "params_dtype"):
            assert getattr(derived, f.name) == getattr(ours, f.name), f.name
