"""SequentialMLP experts run their quantizers grouped (``quantize.grouped_mlp``): the same values and
gradients, bit for bit, as each expert's linear layers quantizing for themselves.

Each test builds a tiny GPT-MoE student twice from the same weights (local spec, real megatron.core
layers, CPU, one gloo process), applies one policy to both, and puts one back on the per-expert path
by undoing only the ``SequentialMLP`` class swap. SwiGLU (tiny_cpu.yaml's experts) and squared ReLU
(the hybrid recipes' experts; in a GPT model, since Mamba layers run forward only on a GPU); and
under tensor parallelism 2 (2 gloo processes), where the experts' linear layers are sharded and
their dynamic amaxes MAX-reduced over the expert TP group. The main comparison also runs on a GPU
(marked gpu), where both paths run Triton kernels. Runtime on 2 CPU cores: about 50 s.
"""

import dataclasses
from pathlib import Path

import pytest
import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from distributed_helpers import gpu_single_process, run_distributed, single_process
from model_helpers import make_batches
from megatron_qad import quantize
from megatron_qad.config import load_config
from megatron_qad import parallel
from megatron_qad.models import build_gpt_model
from megatron_qad.quantize import grouped_mlp
from megatron_qad.quantize.quantizer import TensorQuantizer

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
SMALL = ["model.num_layers=2", "model.seq_length=32"]
EXPERTS = {  # activation -> overrides: tiny_cpu's fp32 SwiGLU, the hybrid recipes' bf16 squared ReLU
    "swiglu": ["model.params_dtype=float32"],
    "squared_relu": ["model.params_dtype=bfloat16", "model.activation=squared_relu"],
}
FORMATS = pytest.mark.parametrize("fmt", ["nvfp4", "nvfp4_4over6"])
ACTIVATIONS = pytest.mark.parametrize("activation", list(EXPERTS))


@pytest.fixture(scope="module")
def cpu_process():
    with single_process(seed=1234) as context:
        yield context


@pytest.fixture(scope="module")
def gpu_process():
    with gpu_single_process() as context:
        yield context


def config_for(activation, *extra):
    return load_config(TINY, [*SMALL, *EXPERTS[activation], *extra])


def experts_of(model) -> list[SequentialMLP]:
    return [module for module in model.modules() if isinstance(module, SequentialMLP)]


def student_pair(config, fmt, amax_mode, prepare=None, device="cpu"):
    """(grouped, per_expert): two students of the same weights on ``device`` under the transformer
    policy in ``fmt``; ``prepare(model)`` edits both before quantization."""
    grouped_model = build_gpt_model(config.model, config.parallel, device)
    per_expert = build_gpt_model(config.model, config.parallel, device)
    per_expert.load_state_dict(grouped_model.state_dict())
    policy = dataclasses.replace(quantize.transformer(fmt), input_amax=amax_mode)
    for model in (grouped_model, per_expert):
        if prepare is not None:
            prepare(model)
        quantize.apply(model, policy)
    assert all(grouped_mlp.is_quantized_sequential_mlp(m) for m in experts_of(grouped_model))
    for module in experts_of(per_expert):
        grouped_mlp.unquantize_sequential_mlp(module)
    return grouped_model, per_expert


def expert_quantizer_calls(model) -> list:
    """A list that grows by one entry at each call of an expert linear layer's own quantizer."""
    calls = []
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer) and ".experts.local_experts." in name:
            module.register_forward_hook(lambda *_, name=name: calls.append(name))
    return calls


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def train_step(model, batches):
    """Forward and backward of each batch (gradients accumulate); the logits of each."""
    logits = []
    for batch in batches:
        output = model(*batch)
        output.float().square().mean().backward()
        logits.append(output.detach())
    return logits


def assert_same_step(grouped_model, per_expert, batches):
    calls_grouped, calls_per_expert = expert_quantizer_calls(grouped_model), expert_quantizer_calls(per_expert)
    for a, b in zip(train_step(grouped_model, batches), train_step(per_expert, batches)):
        assert same_bits(a, b)
    assert not calls_grouped and calls_per_expert  # the grouped forward ran, the reference did not
    per_expert_params = dict(per_expert.named_parameters())
    for name, param in grouped_model.named_parameters():
        other = per_expert_params[name].grad
        assert (param.grad is None) == (other is None), name
        assert param.grad is None or same_bits(param.grad, other), name


def batches_on(device, model_cfg, count: int = 2, seed: int = 0):
    return [tuple(part.to(device) for part in batch) for batch in make_batches(model_cfg, count, seed)]


def check_grouped_student_equals_per_expert_student(device, fmt, activation, amax_mode):
    config = config_for(activation)
    grouped_model, per_expert = student_pair(config, fmt, amax_mode, device=device)
    batches = batches_on(device, config.model, count=2, seed=3)
    if amax_mode == "static":
        calls = expert_quantizer_calls(grouped_model)
        for model in (grouped_model, per_expert):
            quantize.calibrate(model, batches_on(device, config.model, count=2))
        assert calls  # calibration observed each expert on its own
        amaxes = {name: buffer for name, buffer in per_expert.named_buffers() if name.endswith("amax")}
        assert all(same_bits(buffer, amaxes[name]) for name, buffer in grouped_model.named_buffers()
                   if name.endswith("amax"))
    assert_same_step(grouped_model, per_expert, batches)


@FORMATS
@ACTIVATIONS
@pytest.mark.parametrize("amax_mode", ["dynamic", "static"])
def test_grouped_student_equals_per_expert_student(cpu_process, fmt, activation, amax_mode):
    check_grouped_student_equals_per_expert_student("cpu", fmt, activation, amax_mode)


@pytest.mark.gpu
@FORMATS
@ACTIVATIONS
@pytest.mark.parametrize("amax_mode", ["dynamic", "static"])
def test_grouped_student_equals_per_expert_student_on_gpu(gpu_process, fmt, activation, amax_mode):
    """The same on a GPU, where both paths run Triton kernels: the grouped ones (one launch per
    role for all experts) against each expert's own."""
    check_grouped_student_equals_per_expert_student(gpu_process.device, fmt, activation, amax_mode)


def test_calibrated_students_cast_to_bf16_stay_equal(cpu_process):
    """``model.bfloat16()`` casts the calibrated amax buffers too (as after an export); the grouped
    forward scales with them as each expert's quantizer does (the fp32 value of the bf16 buffer)."""
    config = config_for("swiglu")
    grouped_model, per_expert = student_pair(config, "nvfp4", "static")
    for model in (grouped_model, per_expert):
        quantize.calibrate(model, make_batches(config.model, count=2))
        model.bfloat16()
    assert experts_of(grouped_model)[0].local_experts[0].linear_fc1.input_quantizer.amax.dtype == torch.bfloat16
    assert_same_step(grouped_model, per_expert, make_batches(config.model, count=2, seed=3))


@FORMATS
def test_an_expert_routed_no_tokens_and_weights_held_across_micro_batches(cpu_process, fmt):
    """Sigmoid routing with expert 1's selection bias far below the others': it gets no tokens."""
    config = config_for("squared_relu", "model.moe_router_score_function=sigmoid",
                        "model.moe_router_enable_expert_bias=true")

    def starve_expert_1(model):
        for module in model.modules():
            if hasattr(module, "expert_bias") and module.expert_bias is not None:
                module.expert_bias[1] = -1e4

    grouped_model, per_expert = student_pair(config, fmt, "dynamic", starve_expert_1)
    seen = []
    grouped_model.decoder.layers[0].mlp.experts.local_experts[1].linear_fc1.register_forward_hook(
        lambda _, inputs, __: seen.append(inputs[0].shape[0]))
    with quantize.reuse_quantized_weights(grouped_model), quantize.reuse_quantized_weights(per_expert):
        assert_same_step(grouped_model, per_expert, make_batches(config.model, count=3, seed=5))
        held = experts_of(grouped_model)[0].local_experts[0].linear_fc1.weight_quantizer._held
        assert held is not None and held[0][0] == "experts"  # the group's weights were held
    assert seen == [0, 0, 0]


def run_experts(experts, hidden, splits, probs, grad):
    """Output of ``experts`` on ``hidden`` routed as ``splits`` with ``probs``, and the gradients of
    the tokens and the probabilities for the output gradient ``grad``."""
    hidden, probs = hidden.clone().requires_grad_(), probs.clone().requires_grad_()
    output, bias = experts(hidden, torch.tensor(splits), probs)
    assert bias is None
    output.backward(grad)
    return output.detach(), hidden.grad, probs.grad


@pytest.mark.parametrize("activation, fused", [("swiglu", False), ("squared_relu", False), ("swiglu", True)],
                         ids=["swiglu", "squared_relu", "fused_swiglu"])
def test_experts_give_the_same_token_and_probability_gradients(cpu_process, activation, fused):
    """One SequentialMLP called directly, an expert routed no tokens; with megatron.core's fused
    SwiGLU (``bias_activation_fusion``, the only fused activation it weighs by probabilities) too."""
    config = config_for(activation)
    grouped_model, per_expert = student_pair(config, "nvfp4", "dynamic")
    grouped_experts, per_expert_experts = experts_of(grouped_model)[0], experts_of(per_expert)[0]
    for module in (grouped_experts, per_expert_experts):
        module.config.bias_activation_fusion = fused
    assert grouped_experts._grouped_roles() is not None
    splits = [9, 0, 30, 5]
    generator = torch.Generator().manual_seed(11)
    dtype = grouped_experts.local_experts[0].linear_fc1.weight.dtype
    hidden = torch.randn(sum(splits), config.model.hidden_size, generator=generator).to(dtype)
    probs = torch.rand(sum(splits), generator=generator)
    grad = torch.randn(sum(splits), config.model.hidden_size, generator=generator).to(dtype)
    for a, b in zip(run_experts(grouped_experts, hidden, splits, probs, grad),
                    run_experts(per_expert_experts, hidden, splits, probs, grad)):
        assert same_bits(a, b)


def test_remove_gives_back_sequential_mlp(cpu_process):
    config = config_for("swiglu")
    model = build_gpt_model(config.model, config.parallel)
    quantize.apply(model, "transformer")
    quantize.remove(model)
    assert all(type(module) is SequentialMLP for module in experts_of(model))


def _tensor_parallel_rank(activation):
    """One rank of TP=2 (experts sharded over the expert TP group too): a step of both students."""
    config = config_for(activation, "parallel.tensor_model_parallel_size=2")
    parallel.initialize(config.parallel, backend="gloo", seed=config.model.seed)
    try:
        grouped_model, per_expert = student_pair(config, "nvfp4", "dynamic")
        assert experts_of(grouped_model)[0].local_experts[0].linear_fc2.input_quantizer.tp_group.size() == 2
        assert_same_step(grouped_model, per_expert, make_batches(config.model, count=2, seed=7))
    finally:
        parallel.destroy()


@ACTIVATIONS
def test_grouped_student_equals_per_expert_student_under_tensor_parallelism(activation):
    run_distributed(_tensor_parallel_rank, 2, activation, timeout_s=300)
