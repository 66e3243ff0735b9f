"""Real megatron.core GPT models on the CPU: build, forward/backward, TP=2 and EP=2 on gloo."""

from pathlib import Path

import pytest
import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.moe.experts import SequentialMLP

from distributed_helpers import run_distributed, single_process
from model_helpers import assert_trains_in_bf16, build_at_layout, global_expert_name, make_batches
from megatron_qad import parallel
from megatron_qad.config import ConfigError, load_config
from megatron_qad.models import build_gpt_model

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
FP32 = ["model.params_dtype=float32"]
LAYER0 = "decoder.layers.0."
COMPARED_GRADS = (LAYER0 + "self_attention.linear_qkv.weight", LAYER0 + "self_attention.linear_proj.weight",
                  LAYER0 + "mlp.experts.local_experts.1.linear_fc2.weight")


def forward_backward(model, model_cfg):
    """Full-vocabulary logits [b, s, V] (gathered over TP) and the grads of the loss mean(logits^2)."""
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(model(*make_batches(model_cfg, count=1)[0]))
    logits.float().square().mean().backward()
    return logits.detach()


@pytest.fixture(scope="module")
def cpu_process():
    with single_process() as context:
        yield context


@pytest.fixture(scope="module")
def tp1_reference(cpu_process, tmp_path_factory):
    """The fp32 tiny model at TP=1: its state dict file, logits and selected grads."""
    config = load_config(TINY, FP32)
    model = build_gpt_model(config.model, config.parallel)
    logits = forward_backward(model, config.model)
    path = tmp_path_factory.mktemp("tp1") / "model.pt"
    torch.save(model.state_dict(), path)
    params = dict(model.named_parameters())
    return path, logits, {name: params[name].grad.clone() for name in COMPARED_GRADS}


def test_tiny_moe_model_builds_with_the_configured_shapes(cpu_process):
    config = load_config(TINY, ["model.params_dtype=bfloat16"])
    m = config.model
    model = build_gpt_model(m, config.parallel, cpu_process.device)
    assert isinstance(model, GPTModel)
    params = dict(model.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    assert {p.device.type for p in params.values()} == {"cpu"}
    kv_channels = m.hidden_size // m.num_attention_heads
    qkv_rows = (m.num_attention_heads + 2 * m.num_query_groups) * kv_channels
    for layer in range(m.num_layers):
        prefix = f"decoder.layers.{layer}."
        assert params[prefix + "self_attention.linear_qkv.weight"].shape == (qkv_rows, m.hidden_size)
        assert params[prefix + "mlp.router.weight"].shape == (m.num_moe_experts, m.hidden_size)
        assert isinstance(model.decoder.layers[layer].mlp.experts, SequentialMLP)
        for expert in range(m.num_moe_experts):
            fc1 = params[prefix + f"mlp.experts.local_experts.{expert}.linear_fc1.weight"]
            fc2 = params[prefix + f"mlp.experts.local_experts.{expert}.linear_fc2.weight"]
            assert fc1.shape == (2 * m.moe_ffn_hidden_size, m.hidden_size)  # SwiGLU: [gate; up]
            assert fc2.shape == (m.hidden_size, m.moe_ffn_hidden_size)
        shared = m.moe_shared_expert_intermediate_size
        assert params[prefix + "mlp.shared_experts.linear_fc1.weight"].shape == (2 * shared, m.hidden_size)
    assert params["output_layer.weight"].shape == (m.vocab_size, m.hidden_size)


def test_bf16_forward_backward_on_cpu(cpu_process):
    config = load_config(TINY, ["model.params_dtype=bfloat16"])
    assert_trains_in_bf16(build_gpt_model(config.model, config.parallel, cpu_process.device), config.model)


def test_initialisation_is_a_function_of_the_seed(cpu_process):
    config = load_config(TINY, ["model.num_layers=1"])
    first = build_gpt_model(config.model, config.parallel).state_dict()
    again = build_gpt_model(config.model, config.parallel).state_dict()
    config.model.seed += 1
    other = build_gpt_model(config.model, config.parallel).state_dict()
    tensors = [k for k, v in first.items() if isinstance(v, torch.Tensor)]
    assert all(torch.equal(first[k], again[k]) for k in tensors)
    assert not torch.equal(first["decoder.layers.0.self_attention.linear_qkv.weight"],
                           other["decoder.layers.0.self_attention.linear_qkv.weight"])


def test_settings_the_cpu_cannot_build_are_config_errors(cpu_process):
    config = load_config(TINY, ["model.moe_token_dispatcher_type=alltoall"])
    with pytest.raises(ConfigError, match="set model.moe_token_dispatcher_type=allgather"):
        build_gpt_model(config.model, config.parallel, cpu_process.device)
    config = load_config(TINY, ["model.transformer_impl=transformer_engine"])
    with pytest.raises(ConfigError, match="needs Transformer Engine on a GPU.*model.transformer_impl=local"):
        build_gpt_model(config.model, config.parallel, cpu_process.device)


def _run_layout(overrides: list[str], state_dict_path: str | None) -> dict:
    """In a child process: build the fp32 tiny model at the layout of ``overrides``, optionally load
    the TP=1 weights (experts renumbered for this EP rank), run forward + backward."""
    from megatron.core import parallel_state

    config = load_config(TINY, FP32 + overrides)
    context = parallel.initialize(config.parallel, seed=config.model.seed)
    try:
        model, ep_rank, local_experts = build_at_layout(config, context.device, state_dict_path)
        logits = forward_backward(model, config.model)
        params = dict(model.named_parameters())
        return {
            "logits": logits,
            "grads": {global_expert_name(name, ep_rank, local_experts): params[name].grad
                      for name in COMPARED_GRADS if name in params},
            "grads_finite": all(p.grad is not None and bool(torch.isfinite(p.grad).all())
                                for p in model.parameters()),
            "local_experts": local_experts,
            "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        }
    finally:
        parallel.destroy()


@pytest.mark.parametrize("core_attention", ["local", "sdpa"])
def test_tp2_on_two_gloo_processes_matches_tp1(tp1_reference, core_attention):
    """Weights drawn on the CPU and scattered to TP shards: the TP=2 model is the TP=1 model (whose
    attention is megatron.core's local one), with either core attention at TP=2."""
    _, reference_logits, reference_grads = tp1_reference
    results = run_distributed(_run_layout, 2, ["parallel.tensor_model_parallel_size=2",
                                               f"model.core_attention={core_attention}"], None)
    for result in results:
        assert result["grads_finite"]
        torch.testing.assert_close(result["logits"], reference_logits, rtol=1e-5, atol=1e-5)
        rank = result["tp_rank"]
        qkv = reference_grads[LAYER0 + "self_attention.linear_qkv.weight"]
        proj = reference_grads[LAYER0 + "self_attention.linear_proj.weight"]
        rows, cols = qkv.shape[0] // 2, proj.shape[1] // 2
        torch.testing.assert_close(result["grads"][LAYER0 + "self_attention.linear_qkv.weight"],
                                   qkv[rank * rows:(rank + 1) * rows], rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(result["grads"][LAYER0 + "self_attention.linear_proj.weight"],
                                   proj[:, rank * cols:(rank + 1) * cols], rtol=1e-4, atol=1e-8)


def test_ep2_with_allgather_dispatcher_matches_ep1(tp1_reference):
    """Experts split over two gloo processes; with the EP=1 weights loaded the logits are unchanged."""
    path, reference_logits, reference_grads = tp1_reference
    results = run_distributed(_run_layout, 2, ["parallel.expert_model_parallel_size=2"], str(path))
    expert_grads = {}
    for result in results:
        assert result["grads_finite"] and result["local_experts"] == 2
        torch.testing.assert_close(result["logits"], reference_logits, rtol=1e-5, atol=1e-5)
        expert_grads.update(result["grads"])
    # Rank 0 holds global experts 0-1, rank 1 experts 2-3: local expert 1 is global 1 and 3.
    # The two ranks are also two data-parallel replicas, here fed the same micro-batch; the
    # allgather dispatcher routes both replicas' tokens to each expert, so before the data-parallel
    # averaging of megatron.core's DDP an expert's gradient is the sum over both: 2x the EP=1 one.
    expert = LAYER0 + "mlp.experts.local_experts.1.linear_fc2.weight"
    torch.testing.assert_close(expert_grads[expert], 2 * reference_grads[expert], rtol=1e-4, atol=1e-8)
    assert LAYER0 + "mlp.experts.local_experts.3.linear_fc2.weight" in expert_grads
