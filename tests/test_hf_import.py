"""``megatron-qad import``: tiny random models built with transformers' own classes, saved with
``save_pretrained``, imported, loaded into megatron.core models built from the written
``model.yaml``, and compared with transformers' logits on the same tokens in fp32.

Every parameter (norm weights, biases, routers included) is redrawn at random so that no tensor
keeps an initial value (ones, zeros) that would hide a wrong mapping. The fp32 comparisons reach
a max |difference| / max |HF logit| of 3.4e-7 to 4.7e-7 on these models (printed by ``-s``); the bound
is 1e-5, the relative error target of the import.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from distributed_helpers import run_distributed, single_process
from logits_helpers import tensor_parallel_logits
from megatron_qad.cli import main
from megatron_qad.config import ConfigError, load_config
from megatron_qad.hf_import import import_checkpoint

transformers = pytest.importorskip("transformers")

SEQ = 12
REL_TOL = 1e-5
"""Bound on max |megatron - HF| / max |HF| for fp32 logits (measured 3.4e-7 to 4.7e-7: a 20x margin)."""
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=16384)


def _llama(**extra):
    config = transformers.LlamaConfig(**{**SMALL, **extra}, rms_norm_eps=1e-5, rope_theta=500000.0,
                                      rope_scaling=LLAMA3_ROPE)
    return transformers.LlamaForCausalLM(config)


def _qwen2(tie: bool):
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL, rms_norm_eps=1e-6, rope_theta=1e6,
                                                                  tie_word_embeddings=tie))


def _qwen2_moe(norm_topk_prob: bool):
    config = transformers.Qwen2MoeConfig(**SMALL, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                         num_experts=4, num_experts_per_tok=2, norm_topk_prob=norm_topk_prob,
                                         rms_norm_eps=1e-6)
    return transformers.Qwen2MoeForCausalLM(config)


MODELS = {
    "llama": lambda: _llama(),
    "llama-biases-mha": lambda: _llama(attention_bias=True, mlp_bias=True, num_key_value_heads=4, head_dim=32),
    "qwen2-tied": lambda: _qwen2(tie=True),
    "qwen2-untied": lambda: _qwen2(tie=False),
    "qwen2_moe-norm-topk": lambda: _qwen2_moe(True),
    "qwen2_moe-softmax-all": lambda: _qwen2_moe(False),
}


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` in fp32 eval mode with every parameter and float buffer redrawn: N(0, 0.1) for
    matrices and biases, 1 + N(0, 0.1) for 1-D weights (norms)."""
    generator = torch.Generator().manual_seed(seed)
    model = model.float().eval()
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if not tensor.is_floating_point() or "inv_freq" in name:
                continue
            noise = torch.randn(tensor.shape, generator=generator) * 0.1
            tensor.copy_(1 + noise if name.endswith("norm.weight") else noise)
    return model


def tokens(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def megatron_logits(out: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, V] of the model that ``out/model.yaml`` describes, loaded from ``out``, at TP=1."""
    from megatron_qad.models import build_model, causal_attention_mask
    from megatron_qad.train.checkpointing import load_model

    config = load_config(out / "model.yaml", [f"model.seq_length={SEQ}"])
    with single_process(config.parallel):
        model = build_model(config.model, config.parallel).eval()
        load_model([model], out)
        with torch.no_grad():
            positions = torch.arange(SEQ).expand(ids.shape[0], -1)
            return model(ids, positions, causal_attention_mask(SEQ)).float()


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def save(model, directory: Path, max_shard_size: str | None = None) -> Path:
    if max_shard_size:
        model.save_pretrained(directory, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("name", list(MODELS))
def test_imported_model_reproduces_transformers_logits(name, tmp_path):
    model = randomized(MODELS[name]())
    sharded = name in ("qwen2-untied", "qwen2_moe-norm-topk")
    hf_dir = save(model, tmp_path / "hf", max_shard_size="40KB" if sharded else None)
    assert (hf_dir / "model.safetensors.index.json").is_file() == sharded
    import_checkpoint(hf_dir, tmp_path / "out", params_dtype="float32")
    ids = tokens(model.config.vocab_size)
    error = relative_error(megatron_logits(tmp_path / "out", ids), hf_logits(model, ids))
    print(f"{name}: max |megatron - HF| / max |HF| = {error:.2e}")
    assert error < REL_TOL


def test_model_yaml_holds_the_config_json_fields(tmp_path):
    model = randomized(_qwen2_moe(False))
    import_checkpoint(save(model, tmp_path / "hf"), tmp_path / "out")
    section = yaml.safe_load((tmp_path / "out" / "model.yaml").read_text())["model"]
    assert section["norm_epsilon"] == 1e-6 and section["rotary_base"] == 10000
    assert section["add_qkv_bias"] is True and section["moe_router_pre_softmax"] is True
    assert section["moe_shared_expert_gate"] is True and section["moe_shared_expert_intermediate_size"] == 48
    assert section["params_dtype"] == "float32"  # save_pretrained of an fp32 model writes fp32
    assert load_config(tmp_path / "out" / "model.yaml").model.num_moe_experts == 4


def test_imported_checkpoint_loads_at_tp2(tmp_path):
    """The dist checkpoint reshards: two gloo processes at TP=2 compute transformers' logits."""
    model = randomized(_llama())
    import_checkpoint(save(model, tmp_path / "hf"), tmp_path / "out", params_dtype="float32")
    ids = tokens(model.config.vocab_size)
    logits = run_distributed(tensor_parallel_logits, 2, str(tmp_path / "out"), ids, 2, timeout_s=300)
    reference = hf_logits(model, ids)
    for rank_logits in logits:
        assert relative_error(rank_logits, reference) < REL_TOL


def test_base_recipe_keeps_its_sections_and_runtime_fields(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"model": {"num_layers": 9, "hidden_size": 8, "ffn_hidden_size": 8,
                                              "num_attention_heads": 1, "num_query_groups": 1, "vocab_size": 8,
                                              "seq_length": 8, "params_dtype": "bfloat16", "seed": 7},
                                    "training": {"train_iters": 3}}))
    model = randomized(_llama())
    assert main(["import", str(save(model, tmp_path / "hf")), "--out", str(tmp_path / "out"),
                 "--recipe", str(base)]) == 0
    config = load_config(tmp_path / "out" / "recipe.yaml")
    assert config.training.train_iters == 3 and config.teacher.checkpoint == str((tmp_path / "out").resolve())
    assert (config.model.num_layers, config.model.hidden_size, config.model.seq_length) == (2, 64, 8)
    assert (config.model.params_dtype, config.model.seed) == ("bfloat16", 7)
    assert config.model.rope_scaling and config.model.rope_scaling_factor == 8.0


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save(randomized(_llama()), tmp_path_factory.mktemp("llama") / "hf")


@pytest.mark.parametrize("changes, named", [
    ({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}, "field 'architectures'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}, "field 'rope_parameters'"),
    ({"rope_parameters": {**LLAMA3_ROPE, "low_freq_factor": 2.0, "rope_theta": 10000.0}}, "field 'rope_parameters'"),
    ({"hidden_act": "gelu"}, "field 'hidden_act' is 'gelu'"),
    ({"attention_bias": True}, "field 'attention_bias'"),
    ({"hidden_size": 32}, "tensor 'model.embed_tokens.weight'"),  # config.json and weights disagree
])
def test_unreproducible_configs_are_refused_before_writing(llama_dir, tmp_path, changes, named, capsys):
    hf_dir = tmp_path / "hf"
    shutil.copytree(llama_dir, hf_dir)
    _edit_config(hf_dir, **changes)
    assert main(["import", str(hf_dir), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_missing_and_unexpected_tensors_are_named(llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    hf_dir = tmp_path / "hf"
    shutil.copytree(llama_dir, hf_dir)
    tensors = load_file(hf_dir / "model.safetensors")
    tensors["model.layers.0.mlp.extra.weight"] = tensors.pop("model.layers.1.self_attn.k_proj.weight")
    save_file(tensors, hf_dir / "model.safetensors")
    with pytest.raises(ConfigError, match=r"lacks 1 tensor.*model\.layers\.1\.self_attn\.k_proj\.weight"):
        import_checkpoint(hf_dir, tmp_path / "out")
    tensors["model.layers.1.self_attn.k_proj.weight"] = tensors["model.layers.0.mlp.extra.weight"].clone()
    save_file(tensors, hf_dir / "model.safetensors")
    with pytest.raises(ConfigError, match=r"no place for: model\.layers\.0\.mlp\.extra\.weight"):
        import_checkpoint(hf_dir, tmp_path / "out")


def test_output_directory_must_be_new_or_empty(llama_dir, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not empty"):
        import_checkpoint(llama_dir, tmp_path / "out")
    out = tmp_path / "out" / "keep.txt" / "model"  # under a regular file: once a NotADirectoryError traceback
    assert main(["import", str(llama_dir), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"megatron-qad: error: '--out' ({out}) lies under {out.parent}, which is a "
                                       f"regular file, not a directory; choose another --out\n")


# ---------------------------------------------------------------------------------------------
# Published configs: what their config.json fields give, against the repository's recipes.

QWEN2_1P5B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
              "hidden_size": 1536, "intermediate_size": 8960, "max_position_embeddings": 131072,
              "max_window_layers": 28, "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2,
              "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": True,
              "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 151936}
"""Qwen/Qwen2-1.5B's config.json."""
ACEREASON_NEMOTRON_7B = {**QWEN2_1P5B, "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
                         "num_key_value_heads": 4, "rope_theta": 10000, "sliding_window": 4096,
                         "tie_word_embeddings": False, "vocab_size": 152064}
"""nvidia/AceReason-Nemotron-7B's config.json (DeepSeek-R1-Distill-Qwen-7B's architecture)."""
NEMOTRON3_NANO = {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h", "attention_bias": False,
                  "chunk_size": 128, "conv_kernel": 4, "head_dim": 128, "hidden_size": 2688,
                  "hybrid_override_pattern": "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
                  "intermediate_size": 1856, "layer_norm_epsilon": 1e-05, "mamba_head_dim": 64,
                  "mamba_hidden_act": "silu", "mamba_num_heads": 64, "mamba_proj_bias": False,
                  "max_position_embeddings": 262144, "mlp_bias": False, "mlp_hidden_act": "relu2",
                  "moe_intermediate_size": 1856, "moe_shared_expert_intermediate_size": 3712, "n_group": 1,
                  "n_groups": 8, "n_routed_experts": 128, "n_shared_experts": 1, "norm_topk_prob": True,
                  "num_attention_heads": 32, "num_experts_per_tok": 6, "num_hidden_layers": 52,
                  "num_key_value_heads": 2, "residual_in_fp32": False, "routed_scaling_factor": 2.5,
                  "ssm_state_size": 128, "tie_word_embeddings": False, "topk_group": 1, "torch_dtype": "bfloat16",
                  "use_bias": False, "use_conv_bias": True, "vocab_size": 131072}
"""nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16's config.json (the fields that shape the model)."""
ROOT = Path(__file__).resolve().parents[1]
RUN_CHOICES = ("seq_length", "params_dtype", "moe_token_dispatcher_type", "kv_channels")


@pytest.mark.parametrize("published, recipe", [(QWEN2_1P5B, "qwen2_1p5b_shape.yaml"),
                                               (ACEREASON_NEMOTRON_7B, "acereason_nemotron_7b.yaml"),
                                               (NEMOTRON3_NANO, "nemotron3_nano_30b_a3b.yaml")])
def test_published_configs_give_the_recipes_models(published, recipe):
    """The recipe's model equals the published model field for field (the head size compared as
    a size; sequence length, dtype and dispatcher are choices of the run)."""
    import dataclasses

    from megatron_qad.config import ModelConfig
    from megatron_qad.export.hf_names import head_dim
    from megatron_qad.hf_import import HFConfig, family_for

    config = HFConfig(published, "config.json")
    fields = family_for(config).model_fields(config)
    ours = load_config(ROOT / "configs" / recipe).model
    derived = dataclasses.replace(ours, **fields)
    assert head_dim(derived) == head_dim(ours)
    for f in dataclasses.fields(ModelConfig):
        if f.name not in RUN_CHOICES:
            assert getattr(derived, f.name) == getattr(ours, f.name), f.name


# ---------------------------------------------------------------------------------------------
# Nemotron-H: its Mamba layers run only on a GPU, so the CPU checks the mapping tensor by tensor.

NEMOTRON_H_PATTERN = "ME*-"


def _nemotron_h():
    config = transformers.NemotronHConfig(
        hybrid_override_pattern=NEMOTRON_H_PATTERN, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=16, n_routed_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48,
        intermediate_size=96, vocab_size=128, routed_scaling_factor=2.5)
    return transformers.NemotronHForCausalLM(config)


def nemotron_h_megatron_names(hf: dict) -> dict[str, torch.Tensor]:
    """The Megatron tensors of the tiny ``ME*-`` model, written out by hand from the HF ones."""
    b = "backbone.layers"
    qkv = [hf[f"{b}.2.mixer.{p}_proj.weight"] for p in "qkv"]
    groups = 2
    expected = {
        "embedding.word_embeddings.weight": hf["backbone.embeddings.weight"],
        "decoder.final_norm.weight": hf["backbone.norm_f.weight"],
        "output_layer.weight": hf["lm_head.weight"],
        "decoder.layers.0.norm.weight": hf[f"{b}.0.norm.weight"],
        "decoder.layers.0.mixer.conv1d_weight": hf[f"{b}.0.mixer.conv1d.weight"],
        "decoder.layers.0.mixer.conv1d_bias": hf[f"{b}.0.mixer.conv1d.bias"],
        "decoder.layers.1.pre_mlp_layernorm.weight": hf[f"{b}.1.norm.weight"],
        "decoder.layers.1.mlp.router.weight": hf[f"{b}.1.mixer.gate.weight"],
        "decoder.layers.1.mlp.router.expert_bias": hf[f"{b}.1.mixer.gate.e_score_correction_bias"],
        "decoder.layers.1.mlp.shared_experts.linear_fc1.weight": hf[f"{b}.1.mixer.shared_experts.up_proj.weight"],
        "decoder.layers.1.mlp.shared_experts.linear_fc2.weight": hf[f"{b}.1.mixer.shared_experts.down_proj.weight"],
        "decoder.layers.2.input_layernorm.weight": hf[f"{b}.2.norm.weight"],
        "decoder.layers.2.self_attention.linear_qkv.weight":
            torch.cat([p.reshape(groups, -1, 64) for p in qkv], dim=1).reshape(-1, 64),
        "decoder.layers.2.self_attention.linear_proj.weight": hf[f"{b}.2.mixer.o_proj.weight"],
        "decoder.layers.3.pre_mlp_layernorm.weight": hf[f"{b}.3.norm.weight"],
        "decoder.layers.3.mlp.linear_fc1.weight": hf[f"{b}.3.mixer.up_proj.weight"],
        "decoder.layers.3.mlp.linear_fc2.weight": hf[f"{b}.3.mixer.down_proj.weight"],
    }
    for name in ("A_log", "D", "dt_bias", "in_proj.weight", "out_proj.weight", "norm.weight"):
        expected[f"decoder.layers.0.mixer.{name}"] = hf[f"{b}.0.mixer.{name}"]
    for e in range(4):
        expected[f"decoder.layers.1.mlp.experts.local_experts.{e}.linear_fc1.weight"] = \
            hf[f"{b}.1.mixer.experts.{e}.up_proj.weight"]
        expected[f"decoder.layers.1.mlp.experts.local_experts.{e}.linear_fc2.weight"] = \
            hf[f"{b}.1.mixer.experts.{e}.down_proj.weight"]
    return expected


def test_nemotron_h_import_puts_every_tensor_in_place(tmp_path):
    from safetensors.torch import load_file

    from megatron_qad.models import build_model
    from megatron_qad.train.checkpointing import load_model

    hf_dir = save(randomized(_nemotron_h()), tmp_path / "hf")
    import_checkpoint(hf_dir, tmp_path / "out")
    section = yaml.safe_load((tmp_path / "out" / "model.yaml").read_text())["model"]
    assert section["hybrid_layer_pattern"] == NEMOTRON_H_PATTERN and section["moe_router_score_function"] == "sigmoid"
    assert section["moe_router_enable_expert_bias"] and section["moe_router_topk_scaling_factor"] == 2.5
    assert (section["mamba_num_heads"], section["mamba_num_groups"], section["activation"]) == (8, 2, "squared_relu")
    expected = nemotron_h_megatron_names(load_file(hf_dir / "model.safetensors"))
    config = load_config(tmp_path / "out" / "model.yaml")
    with single_process(config.parallel):
        model = build_model(config.model, config.parallel)
        load_model([model], tmp_path / "out")
        state = {name: tensor for name, tensor in model.state_dict().items() if not name.endswith("_extra_state")}
    assert set(state) == set(expected)
    for name, tensor in state.items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize("changes, named", [
    ({"norm_topk_prob": False}, "field 'norm_topk_prob'"),
    ({"n_group": 2, "topk_group": 2}, "field 'topk_group'"),
    ({"layer_norm_epsilon": 1e-6}, "field 'layer_norm_epsilon'"),
    ({"mlp_hidden_act": "gelu"}, "field 'mlp_hidden_act'"),
])
def test_nemotron_h_routing_megatron_cannot_reproduce_is_refused(changes, named):
    from megatron_qad.hf_import import HFConfig, family_for

    config = HFConfig({**NEMOTRON3_NANO, **changes}, "config.json")
    with pytest.raises(ConfigError, match=named):
        family_for(config).model_fields(config)


def test_nemotron_h_group_limited_routing_maps_when_it_matches():
    from megatron_qad.hf_import import HFConfig, family_for

    config = HFConfig({**NEMOTRON3_NANO, "n_group": 8, "topk_group": 3}, "config.json")
    fields = family_for(config).model_fields(config)
    assert (fields["moe_router_num_groups"], fields["moe_router_group_topk"]) == (8, 3)


def _gpu_megatron_logits(out: Path, ids: torch.Tensor) -> torch.Tensor:
    from megatron_qad import parallel
    from megatron_qad.models import build_model, causal_attention_mask
    from megatron_qad.train.checkpointing import load_model

    config = load_config(out / "model.yaml", [f"model.seq_length={SEQ}"])
    context = parallel.initialize(config.parallel, seed=config.model.seed)
    try:
        model = build_model(config.model, config.parallel, context.device).eval()
        load_model([model], out)
        with torch.no_grad():
            ids = ids.to(context.device)
            positions = torch.arange(SEQ, device=context.device).expand(ids.shape[0], -1)
            return model(ids, positions, causal_attention_mask(SEQ, context.device)).float().cpu()
    finally:
        parallel.destroy()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Mamba layers run mamba_ssm's kernels on a GPU")
def test_nemotron_h_import_reproduces_transformers_logits_gpu(tmp_path):
    """fp32, TF32 off (conftest): megatron.core's hybrid model against transformers' NemotronH on
    the same GPU. The Mamba scans run different kernels (chunked SSD in both), so the bound is
    looser than the GPT models' 1e-5: 1e-4 of the largest logit."""
    model = randomized(_nemotron_h())
    import_checkpoint(save(model, tmp_path / "hf"), tmp_path / "out", params_dtype="float32")
    ids = tokens(model.config.vocab_size)
    reference = hf_logits(model.cuda(), ids.cuda()).cpu()
    error = relative_error(_gpu_megatron_logits(tmp_path / "out", ids), reference)
    print(f"nemotron_h: max |megatron - HF| / max |HF| = {error:.2e}")
    assert error < 1e-4


# ---------------------------------------------------------------------------------------------
# Round trip: import -> PTQ (weight-only NVFP4) -> export -> transformers computes the student.

WEIGHT_ONLY = ["quantization.policy=null", "quantization.format=null",
               "quantization.rules=[{weight: nvfp4, input: bf16}]", "quantization.kv_cache=bf16", "export.dtype=float32"]
PTQ = ["training.global_batch_size=2", "training.micro_batch_size=2", "training.eval_iters=1",
       "distill.calibration_iters=1", "data.sources=[{type: random}]"]
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def dequantized_export(directory: Path) -> dict[str, torch.Tensor]:
    """The exported tensors with every NVFP4 weight decoded to fp32 (own E2M1 table: code value x
    E4M3 block scale per 16 columns x tensor scale) and its scale tensors dropped."""
    from safetensors.torch import load_file

    tensors = load_file(directory / "model.safetensors")
    out = {}
    for name, tensor in tensors.items():
        if name.endswith((".weight_scale", ".weight_scale_2", ".input_scale")):
            continue
        module = name.removesuffix(".weight")
        if f"{module}.weight_scale" in tensors:
            codes = torch.stack([tensor & 0xF, tensor >> 4], dim=-1).flatten(-2).long()
            values = E2M1[codes & 7] * torch.where(codes >= 8, -1.0, 1.0)
            blocks = tensors[f"{module}.weight_scale"].float().repeat_interleave(16, dim=-1)
            tensor = values * blocks * tensors[f"{module}.weight_scale_2"].float()
        out[name] = tensor.float()
    return out


def student_logits(config, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits of the run's PTQ student: fake-quantized weights, as the run computes them."""
    from megatron_qad import quantize
    from megatron_qad.models import build_model, causal_attention_mask
    from megatron_qad.train.checkpointing import load_model

    with single_process(config.parallel):
        model = build_model(config.model, config.parallel).eval()
        quantize.apply(model, config.quantization.to_policy())
        load_model([model], Path(config.checkpoint.save) / "ptq")
        with torch.no_grad():
            positions = torch.arange(SEQ).expand(ids.shape[0], -1)
            return model(ids, positions, causal_attention_mask(SEQ)).float()


def test_import_ptq_export_round_trip_reproduces_the_student_in_transformers(tmp_path):
    from megatron_qad.export import export
    from megatron_qad.train import run

    model = randomized(_llama())
    assert main(["import", str(save(model, tmp_path / "hf")), "--out", str(tmp_path / "teacher"),
                 "--recipe", str(ROOT / "configs" / "tiny_cpu.yaml")]) == 0
    overrides = [f"model.seq_length={SEQ}", f"checkpoint.save={tmp_path / 'run'}", *WEIGHT_ONLY, *PTQ]
    run(load_config(tmp_path / "teacher" / "recipe.yaml", overrides), "ptq")
    config = load_config(tmp_path / "teacher" / "recipe.yaml", overrides)
    exported = export(config)
    hf_config = json.loads((exported / "config.json").read_text())
    hf_config.pop("quantization_config")
    restored = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf_config))
    restored.load_state_dict(dequantized_export(exported), strict=True)
    ids = tokens(model.config.vocab_size)
    error = relative_error(hf_logits(restored.float().eval(), ids), student_logits(config, ids))
    print(f"round trip: max |HF(export) - student| / max |student| = {error:.2e}")
    assert error < REL_TOL


@pytest.mark.parametrize("overrides, named", [
    (["model.rope_scaling=true", "model.position_embedding_type=none"], "'model.rope_scaling'"),
    (["model.moe_router_pre_softmax=true", "model.moe_router_score_function=sigmoid"], "'model.moe_router_pre_softmax'"),
    (["model.moe_router_num_groups=2"], "'model.moe_router_group_topk'"),
    (["model.moe_router_num_groups=2", "model.moe_router_group_topk=3"], "group-limited routing"),
    (["model.norm_epsilon=0"], "'model.norm_epsilon'"),
])
def test_the_recipe_fields_the_import_writes_are_validated(overrides, named):
    with pytest.raises(ConfigError, match=named):
        load_config(ROOT / "configs" / "tiny_cpu.yaml", overrides)
