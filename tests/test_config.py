"""The recipe loader: strict keys and types, typed overrides, and size checks that name the key."""

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from megatron_qad.config import ConfigError, ModelConfig, ParallelConfig, QADConfig, load_config

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"

MODEL = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
             vocab_size=256, seq_length=32)


def write(tmp_path, data) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def recipe(tmp_path, parallel=None, **model) -> Path:
    return write(tmp_path, {"model": {**MODEL, **model}, "parallel": parallel or {}})


def error_of(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value)


def test_tiny_recipe_loads_with_types_and_defaults():
    config = load_config(TINY)
    assert isinstance(config, QADConfig)
    assert isinstance(config.model, ModelConfig) and isinstance(config.parallel, ParallelConfig)
    assert config.model.num_moe_experts > 0 and config.model.moe_shared_expert_intermediate_size > 0
    assert config.parallel == ParallelConfig()


def test_missing_or_empty_parallel_section_takes_defaults(tmp_path):
    config = load_config(write(tmp_path, {"model": MODEL}))
    assert config.parallel == ParallelConfig()
    assert load_config(write(tmp_path, {"model": MODEL, "parallel": None})).parallel == ParallelConfig()
    assert config.model.moe_ffn_hidden_size is None and config.model.expert_ffn_hidden_size == 128


def test_overrides_are_parsed_with_the_field_type():
    config = load_config(TINY, ["model.hidden_size=256", "model.init_method_std=1e-3",
                                "model.moe_grouped_gemm=true", "model.moe_ffn_hidden_size=null",
                                "model.params_dtype=float32", "parallel.sequence_parallel=false"])
    assert config.model.hidden_size == 256 and type(config.model.hidden_size) is int
    assert config.model.init_method_std == 1e-3 and type(config.model.init_method_std) is float
    assert config.model.moe_grouped_gemm is True
    assert config.model.moe_ffn_hidden_size is None
    assert config.model.params_dtype == "float32"
    assert config.parallel.sequence_parallel is False


def optional_fields() -> list[str]:
    """Every recipe key whose type allows None, as ``section.key``."""
    hints = typing.get_type_hints(QADConfig)
    return [f"{section.name}.{f.name}" for section in dataclasses.fields(QADConfig)
            for f in dataclasses.fields(hints[section.name])
            if type(None) in typing.get_args(typing.get_type_hints(hints[section.name])[f.name])]


def test_every_optional_key_takes_null_from_the_command_line(tmp_path):
    path = write(tmp_path, {"model": MODEL, "quantization": {"format": "nvfp4"}})
    keys = optional_fields()
    assert {"model.moe_ffn_hidden_size", "teacher.checkpoint", "data.validation_sources"} <= set(keys)
    for key in keys:
        if key in ("quantization.policy",):  # the recipe's format needs a policy; tested on its own below
            continue
        config = load_config(path, [f"{key}=null"])
        section, name = key.split(".")
        assert getattr(getattr(config, section), name) is None, key
    assert "quantization.format sets the format of a built-in policy" in error_of(path, ["quantization.policy=null"])
    assert load_config(write(tmp_path, {"model": MODEL, "quantization": {"rules": [
        {"kinds": ["mlp"], "weight": "nvfp4"}]}}), ["quantization.policy=~"]).quantization.policy is None


@pytest.mark.parametrize("override, expected", [
    ("model.num_moe_experts=null",
     "'model.num_moe_experts' cannot be null; give an integer, or leave the key out for its default (0)"),
    ("model.hybrid_layer_pattern=null",  # a string field would otherwise read the text 'null'
     "'model.hybrid_layer_pattern' cannot be null; give a string, or leave the key out for its default ('')"),
    ("model.normalization=None", "'model.normalization' cannot be null; give one of 'RMSNorm', 'LayerNorm'"),
    ("data.sources=~", "'data.sources' cannot be null; give a list, e.g. [{type: random}], or leave the key "
                       "out for its default ([{'type': 'random'}])"),
    ("model.vocab_size=null", "'model.vocab_size' cannot be null; give an integer; the key is required"),
])
def test_null_for_a_key_that_needs_a_value_names_its_type(tmp_path, override, expected):
    assert expected in error_of(recipe(tmp_path), [override])
    section, _, rest = override.partition(".")
    key, _, _ = rest.partition("=")
    data = {"model": {**MODEL}}
    data.setdefault(section, {})[key] = None
    assert expected.split(";")[0] in error_of(write(tmp_path, data))  # the same refusal in a YAML recipe


def test_yaml_int_is_accepted_for_float(tmp_path):
    assert load_config(recipe(tmp_path, init_method_std=1)).model.init_method_std == 1.0


@pytest.mark.parametrize("overrides, expected", [
    (["model.hiden_size=128"], "unknown key 'model.hiden_size'; did you mean 'model.hidden_size'?"),
    (["paralel.tensor_model_parallel_size=2"], "unknown key 'paralel'; did you mean 'parallel'?"),
    (["model.zzz=1"], "unknown key 'model.zzz'; valid keys in 'model': activation, add_bias_linear"),
    (["model.hidden_size=big"], "'model.hidden_size' must be an integer, got 'big'"),
    (["model.hidden_size=12.5"], "'model.hidden_size' must be an integer, got '12.5'"),
    (["model.moe_grouped_gemm=maybe"], "'model.moe_grouped_gemm' must be true or false"),
    (["model.normalization=BatchNorm"], "'model.normalization' must be one of 'RMSNorm', 'LayerNorm'"),
    (["model.hidden_size"], "must look like section.key=value"),
    (["model=1"], "'model' is a section"),
    (["training.on_nonfinite=retry"], "'training.on_nonfinite' must be one of 'stop', 'skip', got 'retry'"),
    (["training.max_skipped_steps=-1"], "'training.max_skipped_steps' must be >= 0, got -1"),
])
def test_bad_overrides_name_the_key(overrides, expected):
    assert expected in error_of(TINY, overrides)


def test_unknown_yaml_key_at_any_level_suggests_the_fix(tmp_path):
    assert "unknown key 'model.num_layer'; did you mean 'model.num_layers'?" in error_of(
        write(tmp_path, {"model": {**MODEL, "num_layer": 2}}))
    assert "unknown key 'modle'; did you mean 'model'?" in error_of(
        write(tmp_path, {"model": MODEL, "modle": {}}))
    message = error_of(write(tmp_path, {"model": MODEL, "parallel": {"tensor_parallel_size": 2}}))
    assert "unknown key 'parallel.tensor_parallel_size'; did you mean " \
           "'parallel.tensor_model_parallel_size'?" in message


@pytest.mark.parametrize("field, value, expected", [
    ("hidden_size", "64", "'model.hidden_size' must be an integer, got '64' (str)"),
    ("hidden_size", 64.0, "'model.hidden_size' must be an integer, got 64.0 (float)"),
    ("num_layers", True, "'model.num_layers' must be an integer, got True (bool)"),
    ("moe_grouped_gemm", 1, "'model.moe_grouped_gemm' must be true or false, got 1 (int)"),
    ("params_dtype", "fp8", "'model.params_dtype' must be one of 'bfloat16', 'float32', got 'fp8'"),
])
def test_wrong_yaml_types_name_the_key(tmp_path, field, value, expected):
    assert expected in error_of(recipe(tmp_path, **{field: value}))


def test_missing_key_missing_file_and_bad_sections(tmp_path):
    model = dict(MODEL)
    del model["vocab_size"]
    assert "missing key 'model.vocab_size' (an integer); add it to the 'model' section" in error_of(
        write(tmp_path, {"model": model}))
    assert "missing key 'model.num_layers'" in error_of(write(tmp_path, {"parallel": {}}))
    message = error_of(tmp_path / "nope.yaml")
    assert "config file" in message and "nope.yaml' not found" in message
    assert "'model' must be a mapping" in error_of(write(tmp_path, {"model": [1, 2]}))
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: [unclosed\n")
    assert "cannot parse" in error_of(bad_yaml)


@pytest.mark.parametrize("model, parallel, expected", [
    (dict(hidden_size=96, num_attention_heads=5), {},
     "'model.hidden_size' (96) must be a multiple of 'model.num_attention_heads' (5)"),
    (dict(num_attention_heads=4, num_query_groups=3), {},
     "'model.num_attention_heads' (4) must be a multiple of 'model.num_query_groups' (3)"),
    (dict(num_query_groups=1), {"tensor_model_parallel_size": 2},
     "'parallel.tensor_model_parallel_size' (2) must divide 'model.num_query_groups' (1)"),
    (dict(num_attention_heads=2, num_query_groups=2, hidden_size=64), {"tensor_model_parallel_size": 4},
     "'parallel.tensor_model_parallel_size' (4) must divide 'model.num_attention_heads' (2)"),
    (dict(ffn_hidden_size=200), {},
     "'model.ffn_hidden_size' (200) is a GEMM reduction (K) dimension and must be a multiple of 16"),
    (dict(hidden_size=72, num_attention_heads=4), {}, "'model.hidden_size' (72) is a GEMM reduction"),
    (dict(ffn_hidden_size=48), {"tensor_model_parallel_size": 2},
     "'model.ffn_hidden_size' (48) split over 'parallel.tensor_model_parallel_size' (2) gives K = 24"),
    (dict(num_moe_experts=4, moe_ffn_hidden_size=40), {},
     "'model.moe_ffn_hidden_size' (40) is a GEMM reduction (K) dimension"),
    (dict(num_moe_experts=4, moe_router_topk=5), {}, "'model.moe_router_topk' (5) must be <="),
    (dict(num_moe_experts=4, moe_router_enable_expert_bias=True), {},
     "'model.moe_router_enable_expert_bias' needs 'model.moe_router_score_function: sigmoid' (got 'softmax')"),
    (dict(num_moe_experts=4, moe_router_topk_scaling_factor=0.0), {},
     "'model.moe_router_topk_scaling_factor' must be > 0 or null"),
    (dict(num_moe_experts=4, moe_shared_expert_gate=True), {},
     "'model.moe_shared_expert_gate' is true but the model has no shared expert"),
    (dict(num_moe_experts=4), {"expert_model_parallel_size": 3},
     "'parallel.expert_model_parallel_size' (3) must divide 'model.num_moe_experts' (4)"),
    (dict(), {"expert_model_parallel_size": 2}, "the model is dense"),
    (dict(num_moe_experts=4), {"tensor_model_parallel_size": 2, "sequence_parallel": False},
     "'parallel.sequence_parallel: true'"),
    (dict(num_layers=3), {"pipeline_model_parallel_size": 2},
     "'parallel.pipeline_model_parallel_size' (2) x 'parallel.virtual_pipeline_model_parallel_size' (1) "
     "must divide 'model.num_layers' (3)"),
    (dict(num_layers=4), {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 4},
     "x 'parallel.virtual_pipeline_model_parallel_size' (4) must divide 'model.num_layers' (4)"),
    (dict(), {"virtual_pipeline_model_parallel_size": 2},
     "needs 'parallel.pipeline_model_parallel_size' > 1"),
    (dict(seq_length=33), {"tensor_model_parallel_size": 2}, "must divide 'model.seq_length' (33)"),
    (dict(num_layers=0), {}, "'model.num_layers' must be >= 1, got 0"),
    (dict(), {"distributed_timeout_minutes": 0}, "'parallel.distributed_timeout_minutes' must be >= 1, got 0"),
    (dict(hybrid_layer_pattern="M*", transformer_impl="transformer_engine"), {},
     "'model.transformer_impl: transformer_engine' builds GPT models"),
])
def test_inconsistent_sizes_name_the_keys(tmp_path, model, parallel, expected):
    assert expected in error_of(recipe(tmp_path, parallel=parallel, **model))


@pytest.mark.parametrize("recipe, layers, world", [
    ("nemotron3_nano_30b_a3b.yaml", 52, 32), ("acereason_nemotron_7b.yaml", 28, 8),
    ("llama_nemotron_super_49b.yaml", 80, 32)])
def test_real_model_recipes_validate_at_their_cluster_size(recipe, layers, world):
    """Sizes, NVFP4 block fit per TP shard, and the stated cluster tile the layout."""
    from megatron_qad.parallel import check_world_size

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / recipe)
    assert config.model.num_layers == layers
    assert config.distill.loss == "kl" and config.distill.temperature == 1.0
    assert config.quantization.kv_cache == "fp8"
    assert check_world_size(config.parallel, world) >= 1
    tokens = config.training.train_iters * config.training.global_batch_size * config.model.seq_length
    assert 0.3e9 <= tokens <= 0.8e9  # the token budget the recipes state


def test_the_nano_width_benchmark_recipe_keeps_every_width_of_the_nano_recipe():
    """configs/nemotron3_nano_width_bench.yaml: Nano's layer widths, experts, router and Mamba
    settings at a shallow depth with every layer kind; the override lines its header documents
    (EP=2 on two GPUs, two MoE layers) load and tile their world sizes."""
    from megatron_qad.parallel import check_world_size

    configs = Path(__file__).resolve().parents[1] / "configs"
    bench_path = configs / "nemotron3_nano_width_bench.yaml"
    bench, nano = load_config(bench_path), load_config(configs / "nemotron3_nano_30b_a3b.yaml")
    depth = {"num_layers", "hybrid_layer_pattern", "seq_length"}
    differing = {key for key, value in vars(bench.model).items() if getattr(nano.model, key) != value}
    assert differing == depth, differing
    assert set(bench.model.hybrid_layer_pattern) == {"M", "E", "*"}
    assert bench.model.num_moe_experts == 128 and bench.model.moe_ffn_hidden_size == 1856
    assert bench.quantization == nano.quantization
    assert check_world_size(bench.parallel, 1) == 1
    overrides = [line.split("bench.yaml", 1)[1].split() if "bench.yaml " in line else line.split()
                 for line in bench_path.read_text().splitlines()
                 if line.startswith("#   ") and ("parallel." in line or line.startswith("#   model."))]
    overrides = [[token for token in line if "=" in token] for line in overrides]
    assert overrides == [["parallel.expert_model_parallel_size=2"],
                         ["model.num_layers=5", "model.hybrid_layer_pattern=MEM*E"]]
    ep2 = load_config(bench_path, overrides[0])
    assert check_world_size(ep2.parallel, 2) == 2
    assert ep2.training.global_batch_size % (ep2.training.micro_batch_size * 2) == 0
    shallow = load_config(bench_path, overrides[1])
    assert shallow.model.hybrid_layer_symbols.count("E") == 2
