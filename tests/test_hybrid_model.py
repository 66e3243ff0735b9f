"""Hybrid Mamba2-Transformer-MoE models (megatron.core HybridModel) and the layer types of built models.

On the CPU the tiny hybrid model builds with every parameter, its attention / MLP / MoE layers run
forward and backward, and its Mamba layers refuse to run (megatron.core's Mamba2 scan exists only as
mamba_ssm's Triton kernels); the full forward runs in the GPU-marked test.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.ssm.mamba_layer import MambaLayer
from megatron.core.ssm.mamba_mixer import MambaMixer
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer

from distributed_helpers import run_distributed, single_process
from model_helpers import assert_trains_in_bf16, make_batches
from megatron_qad import parallel
from megatron_qad.config import HYBRID_LAYER_SYMBOLS, ConfigError, load_config
from megatron_qad.cpu_support import GatedRMSNorm
from megatron_qad.models import (all_layer_types, build_gpt_model, build_hybrid_model, build_model,
                                 decoder_layers, layer_types, transformer_config)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_HYBRID = CONFIGS / "tiny_hybrid_cpu.yaml"
TINY_GPT = CONFIGS / "tiny_cpu.yaml"
# A hybrid model without Mamba layers: everything the CPU can run.
NO_MAMBA = ["model.hybrid_layer_pattern=*E-*", "model.num_layers=4"]


def expected_layer_types(pattern: str) -> list[tuple[str, str]]:
    return [(f"decoder.layers.{i}", HYBRID_LAYER_SYMBOLS[symbol]) for i, symbol in enumerate(pattern)]


@pytest.fixture(scope="module")
def cpu_process():
    with single_process() as context:
        yield context


@pytest.fixture(scope="module")
def tiny_hybrid(cpu_process):
    config = load_config(TINY_HYBRID)
    return config, build_model(config.model, config.parallel, cpu_process.device)


def test_tiny_hybrid_recipe_is_nemotron_nano_shaped():
    m = load_config(TINY_HYBRID).model
    assert m.is_hybrid and set(m.hybrid_layer_pattern) == {"M", "E", "*"}
    assert m.hybrid_layer_pattern.count("*") == 2 and m.num_layers == 8
    assert m.num_moe_experts == 4 and m.moe_router_topk == 2 and m.moe_shared_expert_intermediate_size > 0
    assert m.activation == "squared_relu" and m.position_embedding_type == "none"
    assert m.num_query_groups < m.num_attention_heads  # GQA


def test_tiny_hybrid_builds_every_layer_with_its_parameters(tiny_hybrid):
    config, model = tiny_hybrid
    m = config.model
    assert isinstance(model, HybridModel)
    params = dict(model.named_parameters())
    assert {p.device.type for p in params.values()} == {"cpu"}
    assert layer_types(model) == expected_layer_types(m.hybrid_layer_pattern)
    inner, heads = m.mamba_inner_size, m.mamba_heads
    groups_state = m.mamba_num_groups * m.mamba_state_dim
    kv_channels = m.hidden_size // m.num_attention_heads
    for i, symbol in enumerate(m.hybrid_layer_pattern):
        prefix, layer = f"decoder.layers.{i}.", model.decoder.layers[i]
        assert layer.layer_number == i + 1
        if symbol == "M":
            assert isinstance(layer, MambaLayer) and isinstance(layer.mixer, MambaMixer)
            assert params[prefix + "mixer.in_proj.weight"].shape == (2 * inner + 2 * groups_state + heads,
                                                                     m.hidden_size)  # z x B C dt
            assert params[prefix + "mixer.out_proj.weight"].shape == (m.hidden_size, inner)
            assert params[prefix + "mixer.conv1d_weight"].shape == (inner + 2 * groups_state, 1, 4)
            assert params[prefix + "mixer.A_log"].shape == params[prefix + "mixer.D"].shape == (heads,)
            # The gated norm is a real module with a parameter (mamba_ssm's is a MagicMock without it).
            assert isinstance(layer.mixer.norm, GatedRMSNorm)
            assert params[prefix + "mixer.norm.weight"].shape == (inner,)
            assert params[prefix + "norm.weight"].shape == (m.hidden_size,)
        elif symbol == "*":
            assert isinstance(layer.self_attention, SelfAttention)
            assert params[prefix + "self_attention.linear_qkv.weight"].shape == (
                (m.num_attention_heads + 2 * m.num_query_groups) * kv_channels, m.hidden_size)
            assert not any(name.startswith(prefix + "mlp.") for name in params)
        else:
            assert isinstance(layer.mlp, MoELayer) and isinstance(layer.mlp.experts, SequentialMLP)
            assert params[prefix + "mlp.router.weight"].shape == (m.num_moe_experts, m.hidden_size)
            for expert in range(m.num_moe_experts):  # squared ReLU: not gated
                assert params[prefix + f"mlp.experts.local_experts.{expert}.linear_fc1.weight"].shape == (
                    m.moe_ffn_hidden_size, m.hidden_size)
            assert params[prefix + "mlp.shared_experts.linear_fc1.weight"].shape == (
                m.moe_shared_expert_intermediate_size, m.hidden_size)
    assert "decoder.final_norm.weight" in params and "output_layer.weight" in params
    # megatron.core keeps the SSM's A_log and D in fp32; everything else has params_dtype.
    assert {p.dtype for n, p in params.items() if not n.endswith(("A_log", "D"))} == {torch.bfloat16}


def test_decoder_layers_name_the_modules_a_quantization_policy_needs(tiny_hybrid):
    _, model = tiny_hybrid
    modules = dict(model.named_modules())
    for layer in decoder_layers(model):
        assert layer.name in modules and layer.index == int(layer.name.rsplit(".", 1)[1])
        if layer.type == "mamba":
            assert isinstance(modules[layer.mixer], MambaMixer) and layer.mlp is None
        elif layer.type == "attention":
            assert isinstance(modules[layer.mixer], SelfAttention) and layer.mlp is None
        else:
            assert layer.mixer is None and layer.mlp_type == layer.type
            assert isinstance(modules[layer.mlp], MoELayer if layer.type == "moe" else MLP)
    assert all_layer_types(model) == [t for _, t in layer_types(model)]


def test_gpt_layers_are_attention_with_their_mlp_named(cpu_process):
    config = load_config(TINY_GPT, ["model.num_layers=2"])
    model = build_model(config.model, config.parallel, cpu_process.device)
    assert isinstance(model, GPTModel)
    assert layer_types(model) == [("decoder.layers.0", "attention"), ("decoder.layers.1", "attention")]
    modules = dict(model.named_modules())
    for layer in decoder_layers(model):
        assert isinstance(modules[layer.mixer], SelfAttention)
        assert layer.mlp == layer.name + ".mlp" and layer.mlp_type == "moe"
        assert isinstance(modules[layer.mlp], MoELayer)
    dense = load_config(TINY_GPT, ["model.num_layers=1", "model.num_moe_experts=0"])
    (layer,) = decoder_layers(build_gpt_model(dense.model, dense.parallel, cpu_process.device))
    assert (layer.type, layer.mlp_type) == ("attention", "mlp")


def test_layer_types_come_from_modules_under_wrappers(tiny_hybrid):
    _, model = tiny_hybrid
    wrapper = torch.nn.Module()
    wrapper.module = model  # as DDP / Float16Module wrap a model
    assert layer_types(wrapper) == [(f"module.{name}", kind) for name, kind in layer_types(model)]


def test_mamba_forward_on_cpu_says_it_needs_the_gpu_kernels(tiny_hybrid):
    config, model = tiny_hybrid
    with pytest.raises(NotImplementedError, match="no torch fallback.*GPU with mamba-ssm installed"):
        model(*make_batches(config.model, count=1)[0])


def test_hybrid_attention_mlp_and_moe_layers_train_on_cpu(cpu_process):
    config = load_config(TINY_HYBRID, NO_MAMBA)
    model = build_model(config.model, config.parallel, cpu_process.device)
    assert layer_types(model) == expected_layer_types("*E-*")
    assert_trains_in_bf16(model, config.model)


def test_checkpoint_keys_of_separate_norms_match_the_fused_te_layout(tiny_hybrid):
    _, model = tiny_hybrid
    keys = {name: tensor.key for name, tensor in model.sharded_state_dict().items()
            if hasattr(tensor, "key")}
    assert keys["decoder.layers.0.norm.weight"] == "decoder.layers.0.mixer.in_proj.layer_norm_weight"
    assert keys["decoder.layers.4.input_layernorm.weight"] == (
        "decoder.layers.4.self_attention.linear_qkv.layer_norm_weight")
    assert keys["decoder.layers.0.mixer.norm.weight"] == "decoder.layers.0.mixer.norm.weight"


def test_hybrid_initialisation_is_a_function_of_the_seed(cpu_process):
    config = load_config(TINY_HYBRID, ["model.hybrid_layer_pattern=M*", "model.num_layers=2",
                                       "model.num_moe_experts=0"])
    first = build_hybrid_model(config.model, config.parallel).state_dict()
    again = build_hybrid_model(config.model, config.parallel).state_dict()
    tensors = [k for k, v in first.items() if isinstance(v, torch.Tensor)]
    assert all(torch.equal(first[k], again[k]) for k in tensors)


def test_bf16_models_hold_every_parameter_in_bf16(cpu_process):
    """megatron.core creates routers' weights and Mamba's A_log, D and dt_bias in fp32; the builders
    cast them (megatron.core's mixed-precision optimizer could not checkpoint a mix), buffers stay."""
    config = load_config(TINY_HYBRID, ["model.params_dtype=bfloat16"])
    model = build_model(config.model, config.parallel, cpu_process.device)
    names = {name for name, _ in model.named_parameters()}
    assert any(name.endswith("mixer.A_log") for name in names) and any(name.endswith("router.weight") for name in names)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    expert_biases = [buffer for name, buffer in model.named_buffers() if name.endswith("router.expert_bias")]
    assert expert_biases and all(bias.dtype == torch.float32 for bias in expert_biases)


def test_gated_rms_norm_matches_the_per_group_formula():
    torch.manual_seed(0)
    norm = GatedRMSNorm(12, eps=1e-5, group_size=4, norm_before_gate=False, dtype=torch.float32)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x, z = torch.randn(3, 5, 12), torch.randn(3, 5, 12)
    gated = x * z * torch.sigmoid(z)
    expected = torch.cat([group / group.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()
                          for group in gated.split(4, -1)], dim=-1)
    torch.testing.assert_close(norm(x, z), expected * norm.weight)
    assert norm(x.bfloat16(), z.bfloat16()).dtype == torch.bfloat16


def test_build_model_dispatches_and_builders_refuse_the_other_kind(cpu_process):
    hybrid, gpt = load_config(TINY_HYBRID), load_config(TINY_GPT)
    with pytest.raises(ConfigError, match="hybrid model; use build_model or build_hybrid_model"):
        build_gpt_model(hybrid.model, hybrid.parallel)
    with pytest.raises(ConfigError, match="GPT model; use build_model or build_gpt_model"):
        build_hybrid_model(gpt.model, gpt.parallel)


@pytest.mark.parametrize("overrides, message", [
    (["model.hybrid_layer_pattern=MEMGEM*E"], "'G' is megatron's symbol for gated delta net"),
    (["model.hybrid_layer_pattern=MEME*M*x"], "'x' is not a layer symbol"),
    (["model.hybrid_layer_pattern=MEME*M*E/M"], "multi-token prediction"),
    (["model.hybrid_layer_pattern=MEME*M*"], "has 7 layers but 'model.num_layers' is 8"),
    (["model.num_moe_experts=0"], "has MoE layers \\(E\\) but 'model.num_moe_experts' is 0"),
    (["model.hybrid_layer_pattern=MMMM*M*-"], "has no MoE layer \\(E\\)"),
    (["model.hybrid_layer_pattern=MEME|*M*E"], "2 '\\|'-separated stages .* is 1"),
    (["model.mamba_num_groups=3"], "multiple of 'model.mamba_num_groups' \\(3\\)"),
    (["model.mamba_num_heads=null", "model.mamba_head_dim=48"], "must divide 2 x 'model.hidden_size'"),
    (["model.mamba_num_heads=6", "model.mamba_num_groups=2", "model.mamba_head_dim=12"],
     "'model.mamba_num_heads' x 'model.mamba_head_dim' \\(72\\) is a GEMM reduction \\(K\\) dimension"),
    (["model.mamba_state_dim=0"], "'model.mamba_state_dim' must be >= 1"),
])
def test_hybrid_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY_HYBRID, overrides)


def test_hybrid_pipeline_settings_that_validate():
    staged = load_config(TINY_HYBRID, ["model.hybrid_layer_pattern=MEM|E*M*E",
                                       "parallel.pipeline_model_parallel_size=2"])
    assert staged.model.hybrid_layer_symbols == "MEME*M*E"  # uneven stages are allowed with '|'
    no_mamba = load_config(TINY_HYBRID, NO_MAMBA + ["model.mamba_num_groups=3"])
    assert no_mamba.model.mamba_num_groups == 3  # Mamba settings are not checked without Mamba layers


def _pipeline_stage_layers() -> dict:
    """In a child process: build the tiny hybrid model as pipeline stage 0 or 1 of 2."""
    from megatron.core import parallel_state

    config = load_config(TINY_HYBRID, ["parallel.pipeline_model_parallel_size=2"])
    context = parallel.initialize(config.parallel, seed=config.model.seed)
    try:
        model = build_model(config.model, config.parallel, context.device)
        return {"stage": parallel_state.get_pipeline_model_parallel_rank(),
                "layers": [(layer.name, layer.index, layer.type) for layer in decoder_layers(model)],
                "all": all_layer_types(model),
                "has_embedding": hasattr(model, "embedding"), "has_output": hasattr(model, "output_layer")}
    finally:
        parallel.destroy()


def test_pipeline_stages_hold_their_share_and_gather_the_whole_pattern():
    pattern = load_config(TINY_HYBRID).model.hybrid_layer_pattern
    everything = [HYBRID_LAYER_SYMBOLS[symbol] for symbol in pattern]
    results = sorted(run_distributed(_pipeline_stage_layers, 2), key=lambda result: result["stage"])
    for stage, result in enumerate(results):
        assert result["all"] == everything
        offset = 4 * stage  # equal shares of 8 layers; local module names restart at 0
        assert result["layers"] == [(f"decoder.layers.{i}", offset + i, everything[offset + i])
                                    for i in range(4)]
    assert results[0]["has_embedding"] and not results[0]["has_output"]
    assert results[1]["has_output"] and not results[1]["has_embedding"]


def _mamba_gpu_missing() -> str:
    """Why the Mamba GPU tests cannot run here ("" when they can)."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if importlib.util.find_spec("mamba_ssm") is None:
        return "needs mamba-ssm (pip install 'megatron-core[ssm]')"
    return ""


needs_mamba_gpu = pytest.mark.skipif(bool(_mamba_gpu_missing()), reason=_mamba_gpu_missing() or "runs")


@pytest.mark.gpu
@needs_mamba_gpu
def test_tiny_hybrid_forward_backward_on_gpu():
    config = load_config(TINY_HYBRID)
    context = parallel.initialize(config.parallel, seed=config.model.seed)  # NCCL, rank 0 of 1
    try:
        model = build_model(config.model, config.parallel, context.device)
        tokens, positions, mask = (t.to(context.device) for t in make_batches(config.model, count=1)[0])
        logits = model(tokens, positions, mask)
        assert logits.shape == (2, config.model.seq_length, config.model.vocab_size)
        assert torch.isfinite(logits).all()
        logits.float().square().mean().backward()
        for name, param in model.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
    finally:
        parallel.destroy()


@pytest.mark.gpu
@needs_mamba_gpu
def test_gated_rms_norm_matches_mamba_ssm_on_gpu():
    from mamba_ssm.ops.triton.layernorm_gated import RMSNorm

    torch.manual_seed(0)
    ours = GatedRMSNorm(256, group_size=64, norm_before_gate=False, device="cuda", dtype=torch.bfloat16)
    theirs = RMSNorm(256, group_size=64, norm_before_gate=False, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        theirs.weight.copy_(ours.weight)
    x, z = torch.randn(2, 64, 256, device="cuda", dtype=torch.bfloat16).unbind(0)
    torch.testing.assert_close(ours(x, z), theirs(x, z), rtol=1.6e-2, atol=1e-2)


def test_recipe_router_settings_reach_megatron_core():
    """The tiny hybrid recipe routes like Nemotron 3 Nano: sigmoid scores, a per-expert bias
    (a buffer of the router, in checkpoints), scaling 2.5, and no bias update during QAD."""
    config = load_config(TINY_HYBRID)
    megatron = transformer_config(config.model, config.parallel, torch.device("cpu"))
    assert (megatron.moe_router_score_function, megatron.moe_router_enable_expert_bias,
            megatron.moe_router_topk_scaling_factor, megatron.moe_router_bias_update_rate) == ("sigmoid", True, 2.5, 0.0)
