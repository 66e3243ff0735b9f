"""Quantization policies: validation, recipe data, and what quantize.apply does to real models."""

from pathlib import Path

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, VocabParallelEmbedding
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.router import TopKRouter

from distributed_helpers import run_distributed, single_process
from megatron_qad import parallel, quantize
from megatron_qad.config import load_config
from megatron_qad.models import build_gpt_model, build_model, causal_attention_mask, decoder_layers
from megatron_qad.numerics import nvfp4
from megatron_qad.quantize import Policy, PolicyError, Rule, policy_from_dict

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
SMALL = ["model.num_layers=2", "model.seq_length=32", "model.params_dtype=bfloat16"]
FP32 = SMALL + ["model.params_dtype=float32"]
QUANTIZER_ATTRIBUTES = ("weight_quantizer", "input_quantizer", "key_quantizer", "value_quantizer")


@pytest.fixture(scope="module")
def cpu_process():
    with single_process(load_config(TINY, FP32).parallel) as context:
        yield context


def build(overrides=FP32):
    config = load_config(TINY, overrides)
    return build_gpt_model(config.model, config.parallel), config.model


def batch(model_cfg, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model_cfg.vocab_size, (2, model_cfg.seq_length), generator=generator)
    return tokens, torch.arange(model_cfg.seq_length).expand(2, -1), causal_attention_mask(model_cfg.seq_length)


def moe_linears(layers: int = 2, experts: int = 4) -> list[str]:
    """Every linear the transformer policy quantizes in the tiny GPT-MoE, spelled out."""
    names = []
    for layer in range(layers):
        prefix = f"decoder.layers.{layer}."
        names += [prefix + "self_attention.linear_qkv", prefix + "self_attention.linear_proj"]
        for expert in range(experts):
            names += [prefix + f"mlp.experts.local_experts.{expert}.linear_fc{i}" for i in (1, 2)]
        names += [prefix + f"mlp.shared_experts.linear_fc{i}" for i in (1, 2)]
    return names


def dense_linears(layers: int = 2) -> list[str]:
    return [f"decoder.layers.{layer}.{name}" for layer in range(layers)
            for name in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")]


def module_classes(model) -> dict[str, type]:
    return {name: type(module) for name, module in model.named_modules()}


def quantized_formats(model) -> dict[str, tuple]:
    """{name: (weight format, input format)} of every swapped linear ("bf16" for no quantizer)."""
    return {name: tuple("bf16" if q is None else q.fmt for q in (m.weight_quantizer, m.input_quantizer))
            for name, m in model.named_modules() if hasattr(m, "weight_quantizer")}


def assert_untouched(model, classes: dict[str, type]) -> None:
    """No module changed class and none carries a quantizer or a K/V hook."""
    assert module_classes(model) == classes
    for name, module in model.named_modules():
        assert not any(hasattr(module, attr) for attr in QUANTIZER_ATTRIBUTES), name
        if isinstance(module, DotProductAttention):
            assert not module._forward_pre_hooks, name


# --------------------------------------------------------------------------------------------
# Policy validation and recipe data


@pytest.mark.parametrize("make, message", [
    (lambda: Policy(rules=(Rule(weight="nvfp5"),)), r"quantization rule 0: format 'nvfp5' is not one of"),
    (lambda: Policy(rules=(Rule(weight="nvfp4"), Rule(weight="nvfp4", input="int8"))),
     r"quantization rule 1: format 'int8'"),
    (lambda: Policy(rules=(Rule(weight="nvfp4", kinds=("mlp", "router")),)),
     r"quantization rule 0: unknown kind\(s\) \['router'\].*router, embedding and output_layer always stay BF16"),
    (lambda: Policy(rules=(Rule(weight="bf16", kinds=("mlp",), feeds_attention=True),)),
     r"feeds_attention applies to mamba_mixer modules only"),
    (lambda: Policy(rules=(), kv_cache="int8"), r"quantization\.kv_cache is 'int8'; use one of \('fp8', 'bf16'\)"),
    (lambda: Policy(rules=(), input_amax="percentile"),
     r"quantization\.input_amax is 'percentile'; use one of \('static', 'dynamic'\)"),
])
def test_invalid_policy_settings_raise_policy_errors_naming_them(make, message):
    with pytest.raises(PolicyError, match=message):
        make()


def test_valid_policies_and_builtins():
    assert Policy(rules=(Rule(weight="nvfp4_4over6", input="bf16", kinds=("moe_expert",)),),
                  kv_cache="bf16", input_amax="dynamic").rules[0].input_format == "bf16"
    assert Rule(weight="nvfp4").input_format == "nvfp4"  # input: same as weight by default
    assert quantize.transformer().rules == (
        Rule(weight="nvfp4", kinds=("attention", "mlp", "moe_expert", "shared_expert", "linear_replacement")),)
    assert quantize.transformer("nvfp4_4over6").rules[0].weight == "nvfp4_4over6"
    assert (quantize.transformer().kv_cache, quantize.transformer().input_amax) == ("fp8", "static")
    hybrid = quantize.hybrid()
    assert [rule.weight for rule in hybrid.rules] == ["nvfp4", "bf16"] and hybrid.rules[1].feeds_attention
    assert "attention" not in hybrid.rules[0].kinds
    with pytest.raises(PolicyError, match="format 'int4'"):
        quantize.transformer("int4")


def test_policy_from_dict_builtin_plus_rules():
    assert policy_from_dict({"policy": "transformer"}) == quantize.transformer()
    policy = policy_from_dict({"policy": "hybrid", "format": "nvfp4_4over6", "kv_cache": "bf16",
                               "input_amax": "dynamic"})
    assert policy.rules == quantize.hybrid("nvfp4_4over6").rules
    assert (policy.name, policy.kv_cache, policy.input_amax) == ("hybrid", "bf16", "dynamic")

    policy = policy_from_dict({"policy": "transformer", "rules": [
        {"kinds": ["moe_expert"], "weight": "nvfp4_4over6"},
        {"modules": ["decoder.layers.0.*"], "weight": "bf16", "input": "bf16"}]})
    assert policy.rules == quantize.transformer().rules + (
        Rule(weight="nvfp4_4over6", kinds=("moe_expert",)),
        Rule(weight="bf16", input="bf16", modules=("decoder.layers.0.*",)))
    assert (policy.name, policy.kv_cache, policy.input_amax) == ("transformer", "fp8", "static")

    custom = policy_from_dict({"rules": [{"kinds": ["mlp"], "weight": "nvfp4"}]})
    assert custom.name == "custom" and custom.rules == (Rule(weight="nvfp4", kinds=("mlp",)),)
    assert policy_from_dict({}).rules == ()


@pytest.mark.parametrize("settings, message", [
    ({"policy": "transfomer"}, r"quantization\.policy is 'transfomer'; built-ins are \['hybrid', 'transformer'\]"),
    ({"polcy": "transformer"}, r"quantization: unknown key\(s\) \['polcy'\]"),
    ({"policy": "transformer", "kv_cache": "fp8", "input_amx": "static"}, r"unknown key\(s\) \['input_amx'\]"),
    ({"rules": [{"weight": "nvfp4"}, {"kind": ["mlp"], "weight": "nvfp4"}]},
     r"quantization\.rules\[1\]: unknown key\(s\) \['kind'\]"),
    ({"rules": [{"kinds": ["mlp"]}]}, r"quantization\.rules\[0\] needs 'weight'"),
    ({"rules": [{"kinds": ["embedding"], "weight": "nvfp4"}]}, r"unknown kind\(s\) \['embedding'\]"),
    ({"rules": [{"weight": "fp4"}]}, r"format 'fp4'"),
    ({"kv_cache": "fp4"}, r"quantization\.kv_cache is 'fp4'"),
    ({"input_amax": "max"}, r"quantization\.input_amax is 'max'"),
])
def test_policy_from_dict_errors_name_the_setting(settings, message):
    with pytest.raises(PolicyError, match=message):
        policy_from_dict(settings)


# --------------------------------------------------------------------------------------------
# Built-in policies on real models


def test_transformer_policy_on_the_tiny_moe_model(cpu_process):
    model, model_cfg = build()
    classes = module_classes(model)
    report = quantize.apply(model, "transformer")
    formats = quantized_formats(model)
    assert sorted(formats) == sorted(moe_linears())
    assert set(formats.values()) == {("nvfp4", "nvfp4")}
    modules = dict(model.named_modules())
    for name in formats:
        module = modules[name]
        assert type(module).__name__ == f"Quantized{classes[name].__name__}"
        assert isinstance(module, classes[name]) and module.original_class is classes[name]
        assert (module.weight_quantizer.amax_mode, module.input_quantizer.amax_mode) == ("dynamic", "static")
    for name, cls in classes.items():
        if name not in formats and cls not in (DotProductAttention, SequentialMLP):
            assert type(modules[name]) is cls, name
    for module in model.modules():  # their experts' quantizers run grouped
        if isinstance(module, SequentialMLP):
            assert type(module).__name__ == "QuantizedSequentialMLP" and module.original_class is SequentialMLP
    for name, module in model.named_modules():
        if isinstance(module, DotProductAttention):
            assert type(module).__name__ == "QuantizedDotProductAttention", name
            assert module.original_class is DotProductAttention, name
            assert (module.key_quantizer.fmt, module.value_quantizer.fmt) == ("fp8", "fp8"), name
    # Router, embedding and output layer stay as they were, without quantizers.
    routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
    assert len(routers) == model_cfg.num_layers
    for module in routers + [model.embedding.word_embeddings, model.output_layer]:
        assert type(module) in (TopKRouter, VocabParallelEmbedding, ColumnParallelLinear)
        assert not any(hasattr(module, attr) for attr in QUANTIZER_ATTRIBUTES)
    assert {row.name: row.weight_format for row in report.rows}["output_layer"] == "bf16"


def test_transformer_policy_on_a_dense_model(cpu_process):
    model, _ = build(FP32 + ["model.num_moe_experts=0"])
    classes = module_classes(model)
    assert not any("experts" in name or "router" in name for name in classes)
    report = quantize.apply(model, quantize.transformer())
    assert quantized_formats(model) == {name: ("nvfp4", "nvfp4") for name in dense_linears()}
    assert type(model.output_layer) is ColumnParallelLinear
    assert {row.kind for row in report.rows} == {"attention", "mlp", "output_layer"}
    assert report.kv_fp8_modules == 2


def test_hybrid_policy_by_name_keeps_attention_in_bf16(cpu_process):
    model, _ = build()
    quantize.apply(model, "hybrid")
    formats = quantized_formats(model)
    assert sorted(formats) == sorted(name for name in moe_linears() if "self_attention" not in name)
    assert set(formats.values()) == {("nvfp4", "nvfp4")}
    assert type(model.decoder.layers[0].self_attention.linear_qkv) is ColumnParallelLinear


def test_user_rules_apply_in_order_later_rules_win(cpu_process):
    model, _ = build()
    quantize.apply(model, policy_from_dict({"policy": "transformer", "rules": [
        {"kinds": ["moe_expert"], "weight": "nvfp4_4over6"},
        {"modules": ["decoder.layers.0.*"], "weight": "bf16"},
        {"kinds": ["attention"], "weight": "nvfp4", "input": "bf16"}]}))
    formats = quantized_formats(model)
    expected = {}
    for name in moe_linears():
        if "self_attention" in name:
            expected[name] = ("nvfp4", "bf16")  # the last rule, also in layer 0
        elif name.startswith("decoder.layers.1.") and ".local_experts." in name:
            expected[name] = ("nvfp4_4over6", "nvfp4_4over6")
        elif name.startswith("decoder.layers.1."):
            expected[name] = ("nvfp4", "nvfp4")
    assert formats == expected
    assert type(model.decoder.layers[0].mlp.shared_experts.linear_fc1) is ColumnParallelLinear

    # The same two rules the other way round: the expert rule now beats the layer-0 rule.
    model, _ = build()
    quantize.apply(model, policy_from_dict({"policy": "transformer", "rules": [
        {"modules": ["decoder.layers.0.*"], "weight": "bf16"},
        {"kinds": ["moe_expert"], "weight": "nvfp4_4over6"}]}))
    formats = quantized_formats(model)
    assert formats["decoder.layers.0.mlp.experts.local_experts.2.linear_fc1"] == ("nvfp4_4over6",) * 2
    assert "decoder.layers.0.self_attention.linear_qkv" not in formats
    assert formats["decoder.layers.1.self_attention.linear_qkv"] == ("nvfp4", "nvfp4")


def test_a_modules_glob_matching_nothing_is_an_error_listing_real_names(cpu_process):
    model, _ = build()
    classes = module_classes(model)
    policy = policy_from_dict({"policy": "transformer",
                               "rules": [{"modules": ["decoder.layer.*.mlp.*"], "weight": "bf16"}]})
    with pytest.raises(PolicyError, match=r"quantization rule 1: modules pattern 'decoder\.layer\.\*\.mlp\.\*' "
                                          r"matches no linear layer.*names look like "
                                          r"decoder\.layers\.0\.self_attention\.linear_proj"):
        quantize.apply(model, policy)
    assert_untouched(model, classes)


def _megatron_gpt_with_ffn(ffn_hidden_size: int) -> GPTModel:
    """A dense megatron.core GPT built directly (not through megatron_qad's validated config)."""
    config = TransformerConfig(num_layers=2, hidden_size=64, ffn_hidden_size=ffn_hidden_size,
                               num_attention_heads=4, hidden_dropout=0.0, attention_dropout=0.0,
                               params_dtype=torch.float32, use_cpu_initialization=True,
                               normalization="RMSNorm", cuda_graph_modules=[])
    return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                    vocab_size=256, max_sequence_length=32)


def test_k_not_a_multiple_of_16_is_refused_before_any_module_changes(cpu_process):
    model = _megatron_gpt_with_ffn(72)
    assert model.decoder.layers[0].mlp.linear_fc2.weight.shape == (64, 72)
    classes = module_classes(model)
    with pytest.raises(PolicyError, match=r"decoder\.layers\.0\.mlp\.linear_fc2: its weight \(64, 72\) "
                                          r"has K = 72 .*not a multiple of 16"):
        quantize.apply(model, "transformer")
    assert_untouched(model, classes)  # attention of layer 0 comes first in module order: not swapped
    # The fix the message suggests (keep those layers in BF16) works.
    quantize.apply(model, policy_from_dict({"policy": "transformer", "rules": [
        {"modules": ["decoder.layers.*.mlp.linear_fc2"], "weight": "bf16"}]}))
    assert sorted(quantized_formats(model)) == sorted(
        name for name in dense_linears() if not name.endswith("linear_fc2"))


def test_unknown_builtin_and_applying_twice_are_errors(cpu_process):
    model, _ = build()
    classes = module_classes(model)
    with pytest.raises(PolicyError, match=r"unknown policy 'transfomer'; built-ins are \['hybrid', 'transformer'\]"):
        quantize.apply(model, "transfomer")
    assert_untouched(model, classes)
    quantize.apply(model, "transformer")
    swapped = module_classes(model)
    with pytest.raises(PolicyError, match=r"already quantized.*quantize\.remove\(model\) first"):
        quantize.apply(model, "hybrid")
    assert module_classes(model) == swapped
    kv_only = Policy(rules=(), kv_cache="fp8")  # only K/V hooks count as quantized too
    quantize.remove(model)
    quantize.apply(model, kv_only)
    assert quantized_formats(model) == {}
    with pytest.raises(PolicyError, match="already quantized"):
        quantize.apply(model, kv_only)


def test_native_backend_on_a_local_spec_model_and_unknown_backends_are_refused(cpu_process):
    """``backend="te"`` runs NVFP4 GEMMs in Transformer Engine layers: a local-spec model is refused
    before any module changes, with the setting that fixes it."""
    model, _ = build()
    classes = module_classes(model)
    with pytest.raises(PolicyError, match=r"decoder\.layers\.0\.self_attention\.linear_proj: 'quantization\.backend: "
                                          r"te' runs NVFP4 GEMMs in Transformer Engine layers.*"
                                          r"model\.transformer_impl=transformer_engine"):
        quantize.apply(model, "transformer", backend="te")
    assert_untouched(model, classes)
    with pytest.raises(PolicyError, match=r"backend must be one of \('emulated', 'te'\), got 'auto'"):
        quantize.apply(model, "transformer", backend="auto")
    assert_untouched(model, classes)


def test_remove_restores_the_classes_and_the_exact_bf16_outputs(cpu_process):
    model, model_cfg = build(SMALL)  # BF16 parameters
    assert next(model.parameters()).dtype == torch.bfloat16
    classes = module_classes(model)
    keys = list(model.state_dict())
    inputs = batch(model_cfg)
    with torch.no_grad():
        bf16_logits = model(*inputs)
        quantize.apply(model, "transformer")
        quantize.calibrate(model, [inputs])
        assert not torch.equal(model(*inputs), bf16_logits)
        quantize.remove(model)
        assert torch.equal(model(*inputs), bf16_logits)
    assert_untouched(model, classes)
    assert list(model.state_dict()) == keys
    quantize.apply(model, "transformer")  # and it can be quantized again
    assert sorted(quantized_formats(model)) == sorted(moe_linears())


def test_four_over_six_policy(cpu_process):
    model, model_cfg = build()
    report = quantize.apply(model, quantize.transformer("nvfp4_4over6"))
    formats = quantized_formats(model)
    assert sorted(formats) == sorted(moe_linears())
    assert set(formats.values()) == {("nvfp4_4over6", "nvfp4_4over6")}
    quantize.calibrate(model, [batch(model_cfg)])
    modules = dict(model.named_modules())
    differs = []
    with torch.no_grad():
        for name in formats:
            module = modules[name]
            fq = module.weight_quantizer(module.weight)
            assert torch.equal(fq, nvfp4.fake_quantize(module.weight, four_over_six=True)), name
            differs.append(not torch.equal(fq, nvfp4.fake_quantize(module.weight)))
            x = torch.randn(8, module.weight.shape[1], generator=torch.Generator().manual_seed(1))
            amax = module.input_quantizer.amax
            assert torch.equal(module.input_quantizer(x), nvfp4.fake_quantize(x, amax, four_over_six=True)), name
    assert all(differs)
    attention = model.decoder.layers[0].self_attention.core_attention
    assert (attention.key_quantizer.fmt, attention.value_quantizer.fmt) == ("fp8", "fp8")
    rows = [row for row in report.rows if row.name in formats]
    assert {row.weight_format for row in rows} == {"nvfp4_4over6"}
    assert report.nvfp4_params == sum(row.params for row in rows)
    assert report.mean_rel_mse() == pytest.approx(
        sum(row.params * row.rel_mse_4over6 for row in rows) / sum(row.params for row in rows), rel=1e-12)
    assert report.mean_rel_mse() < sum(row.params * row.rel_mse_nvfp4 for row in rows) / report.nvfp4_params


# --------------------------------------------------------------------------------------------
# The hybrid policy on a Mamba-attention-MoE model (built on the CPU; its forward needs a GPU)

HYBRID = Path(__file__).resolve().parents[1] / "configs" / "tiny_hybrid_cpu.yaml"


def _hybrid_formats(overrides=()) -> dict[str, tuple[str, str]]:
    """{linear name (global layer numbers): (weight, input)} of this rank's hybrid student."""
    config = load_config(HYBRID, list(overrides))
    model = build_model(config.model, config.parallel)
    report = quantize.apply(model, "hybrid")
    offset = {layer.name: layer.index for layer in decoder_layers(model)}
    formats = {}
    for row in report.rows:
        layer = next((name for name in offset if row.name.startswith(name + ".")), None)
        name = row.name if layer is None else row.name.replace(layer, f"decoder.layers.{offset[layer]}", 1)
        formats[name] = (row.weight_format, row.input_format)
    return formats


def _expected_hybrid_bf16(formats) -> set[str]:
    """Pattern MEME*M*E: attention layers 4 and 6 and their nearest Mamba layers 2 and 5."""
    return {name for name in formats if name.startswith(tuple(f"decoder.layers.{i}." for i in (2, 4, 5, 6)))}


def test_hybrid_policy_keeps_attention_and_the_mamba_layer_feeding_it_in_bf16(cpu_process):
    formats = _hybrid_formats()
    bf16 = _expected_hybrid_bf16(formats) | {"output_layer"}
    assert {name for name, f in formats.items() if f == ("bf16", "bf16")} == bf16
    assert {f for name, f in formats.items() if name not in bf16} == {("nvfp4", "nvfp4")}
    assert "decoder.layers.0.mixer.in_proj" in formats and "decoder.layers.7.mlp.shared_experts.linear_fc2" in formats


def _hybrid_formats_pp2():
    parallel.initialize(load_config(HYBRID, ["parallel.pipeline_model_parallel_size=2"]).parallel)
    try:
        return _hybrid_formats(["parallel.pipeline_model_parallel_size=2"])
    finally:
        parallel.destroy()


def test_hybrid_policy_across_pipeline_stages():
    """At PP=2 the stages are MEME | *M*E: layer 2's Mamba feeds layer 4's attention on the other stage."""
    stage0, stage1 = run_distributed(_hybrid_formats_pp2, 2, timeout_s=180)
    assert not stage0.keys() & stage1.keys() - {"output_layer"}
    formats = {**stage0, **stage1}
    bf16 = _expected_hybrid_bf16(formats) | {"output_layer"}
    assert {name for name, f in formats.items() if f == ("bf16", "bf16")} == bf16
    assert stage0["decoder.layers.2.mixer.out_proj"] == ("bf16", "bf16")
    assert stage0["decoder.layers.0.mixer.in_proj"] == ("nvfp4", "nvfp4")


def test_report_of_a_model_with_tied_output_layer(cpu_process):
    """With embeddings shared with the output layer, the output layer owns no weight: its report
    row counts 0 parameters (the embedding row has them) and quantizing the rest works as usual."""
    model, _ = build([*FP32, "model.share_embeddings_and_output_weights=true"])
    assert model.output_layer.weight is None
    report = quantize.apply(model, "transformer")
    rows = {row.name: row for row in report.rows}
    assert (rows["output_layer"].weight_format, rows["output_layer"].params) == ("bf16", 0)
    assert sorted(quantized_formats(model)) == sorted(moe_linears())
