"""``model.core_attention: sdpa``: the same model as megatron.core's local attention, through torch's fused kernel."""

from pathlib import Path

import pytest
import torch

from distributed_helpers import single_process
from model_helpers import make_batches
from megatron_qad import parallel, quantize
from megatron_qad.config import ConfigError, load_config
from megatron_qad.evaluate.chat import padded_inputs
from megatron_qad.models import build_gpt_model, build_model, causal_attention_mask
from megatron_qad.sdpa_attention import SdpaAttention

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
DENSE_FP32 = ["model.params_dtype=float32", "model.num_moe_experts=0", "model.num_layers=2"]
# fp32 on the CPU: the two orders of summation differ by float32 roundings (measured: logits differ by at
# most 4.2e-7, the QKV weight's gradient by 2.9e-7 of its largest entry); the bounds keep a margin of 20x.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def cpu_process():
    with single_process() as context:
        yield context


def pair(overrides: list[str] = ()):
    """The same tiny model (same seed, so the same weights) with local and with sdpa core attention."""
    config = load_config(TINY, DENSE_FP32 + list(overrides))
    local = build_gpt_model(config.model, config.parallel)
    config.model.core_attention = "sdpa"
    sdpa = build_gpt_model(config.model, config.parallel)
    sdpa.load_state_dict(local.state_dict())
    return config, local, sdpa


def test_sdpa_is_built_into_every_layer_and_changes_no_checkpoint_key(cpu_process):
    _, local, sdpa = pair()
    assert all(isinstance(layer.self_attention.core_attention, SdpaAttention) for layer in sdpa.decoder.layers)
    assert not any(isinstance(layer.self_attention.core_attention, SdpaAttention) for layer in local.decoder.layers)
    assert local.state_dict().keys() == sdpa.state_dict().keys()


def test_causal_logits_and_gradients_match_the_local_attention(cpu_process):
    config, local, sdpa = pair()
    batch = make_batches(config.model, count=1)[0]
    assert batch[2] is causal_attention_mask(config.model.seq_length)  # the training path's shared mask
    outputs = []
    for model in (local, sdpa):
        logits = model(*batch)
        logits.square().mean().backward()
        outputs.append((logits.detach(), model.decoder.layers[0].self_attention.linear_qkv.weight.grad))
    torch.testing.assert_close(outputs[1][0], outputs[0][0], **TOLERANCE)
    torch.testing.assert_close(outputs[1][1], outputs[0][1], rtol=1e-5, atol=1e-8)


def test_a_padding_mask_is_applied_as_given(cpu_process):
    """Chat evaluation's left-padded rows (a mask other than the causal one) give the local logits."""
    config, local, sdpa = pair()
    tokens = make_batches(config.model, count=1)[0][0]
    positions, mask = padded_inputs(tokens, torch.tensor([0, 5]))
    with torch.no_grad():
        torch.testing.assert_close(sdpa(tokens, positions, mask), local(tokens, positions, mask), **TOLERANCE)


def test_fp8_kv_cache_quantization_wraps_sdpa_as_it_wraps_local(cpu_process):
    config, local, sdpa = pair(["quantization.input_amax=dynamic"])
    for model in (local, sdpa):
        quantize.apply([model], config.quantization.to_policy())
    assert isinstance(sdpa.decoder.layers[0].self_attention.core_attention, SdpaAttention)
    batch = make_batches(config.model, count=1)[0]
    with torch.no_grad():
        torch.testing.assert_close(sdpa(*batch), local(*batch), **TOLERANCE)


def test_hybrid_attention_layers_take_sdpa_too(cpu_process):
    """The attention layers of a hybrid stack (no Mamba layer here: those need the GPU kernels)."""
    config = load_config(TINY.with_name("tiny_hybrid_cpu.yaml"), ["model.params_dtype=float32",
                                                                  "model.hybrid_layer_pattern=*E-*", "model.num_layers=4"])
    local = build_model(config.model, config.parallel)
    config.model.core_attention = "sdpa"
    sdpa = build_model(config.model, config.parallel)
    sdpa.load_state_dict(local.state_dict())
    assert isinstance(sdpa.decoder.layers[3].self_attention.core_attention, SdpaAttention)
    batch = make_batches(config.model, count=1)[0]
    with torch.no_grad():
        torch.testing.assert_close(sdpa(*batch), local(*batch), **TOLERANCE)


def test_sdpa_with_transformer_engine_layers_is_a_config_error():
    with pytest.raises(ConfigError, match="set model.core_attention=local"):
        load_config(TINY, ["model.core_attention=sdpa", "model.transformer_impl=transformer_engine"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_flash_attention_on_gpu_matches_the_local_attention():
    """On a GPU the causal path runs FlashAttention in bf16: the logits stay within bf16's spread of
    the unfused product (relative L2 below 1 %; bf16 rounding of the logits alone is about 0.4 %)."""
    config = load_config(TINY, ["model.num_moe_experts=0", "model.num_layers=2", "model.seq_length=256"])
    context = parallel.initialize(config.parallel, backend="nccl", seed=config.model.seed)
    try:
        local = build_gpt_model(config.model, config.parallel, context.device)
        config.model.core_attention = "sdpa"
        sdpa = build_gpt_model(config.model, config.parallel, context.device)
        sdpa.load_state_dict(local.state_dict())
        tokens, positions, _ = make_batches(config.model, count=1)[0]
        tokens, positions = tokens.to(context.device), positions.to(context.device)
        mask = causal_attention_mask(config.model.seq_length, context.device)
        with torch.no_grad():
            want, got = (model(tokens, positions, mask).float() for model in (local, sdpa))
        assert (got - want).norm() / want.norm() < 1e-2
    finally:
        parallel.destroy()
