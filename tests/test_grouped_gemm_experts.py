"""``model.moe_grouped_gemm: true`` in the local spec (``grouped_experts.GroupedGemmSequentialMLP``):
the experts' GEMMs as one grouped GEMM per linear layer, with ``SequentialMLP``'s parameters and
checkpoint keys.

Each CPU test builds a tiny GPT-MoE model twice from the same weights (real megatron.core layers,
one gloo process), once with per-expert ``SequentialMLP`` experts and once grouped. On the CPU
torch's grouped_mm runs one matmul per expert (``test_quantize_grouped.py`` checks that it equals
each expert's GEMM), so logits and gradients must be equal bit for bit, in BF16 and as NVFP4
students (grouped quantizers, stacked quantized weights); at EP=2 and TP=2 too (2 gloo processes).
On a GPU (marked gpu) the grouped kernel
sums in another order: there it must be as close to an fp64 reference as the per-expert GEMMs are.
Runtime on 2 CPU cores: about 30 s, plus about 25 s for each of the two 2-process layouts.
"""

import dataclasses
from pathlib import Path

import pytest
import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from distributed_helpers import gpu_single_process, run_distributed, single_process
from model_helpers import make_batches
from megatron_qad import quantize
from megatron_qad.config import ParallelConfig, load_config
from megatron_qad.grouped_experts import GroupedGemmSequentialMLP
from megatron_qad.models import build_gpt_model, build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_cpu.yaml"
SMALL = ["model.num_layers=2", "model.seq_length=32"]
EXPERTS = {  # activation -> overrides: tiny_cpu's fp32 SwiGLU, the hybrid recipes' bf16 squared ReLU
    "swiglu": ["model.params_dtype=float32"],
    "squared_relu": ["model.params_dtype=bfloat16", "model.activation=squared_relu"],
}
ACTIVATIONS = pytest.mark.parametrize("activation", list(EXPERTS))


@pytest.fixture(scope="module")
def cpu_process():
    with single_process(seed=1234) as context:
        yield context


def config_for(activation, grouped_gemm, *extra):
    return load_config(TINY, [*SMALL, *EXPERTS[activation], f"model.moe_grouped_gemm={str(grouped_gemm).lower()}",
                              *extra])


def batches(count: int = 2, seed: int = 0):
    return make_batches(config_for("swiglu", False).model, count, seed)


def experts_of(model) -> list[SequentialMLP]:
    return [module for module in model.modules() if isinstance(module, SequentialMLP)]


def model_pair(activation, *extra, device="cpu"):
    """(grouped, per_expert): two models of the same weights on ``device``."""
    grouped = build_gpt_model(config_for(activation, True, *extra).model, ParallelConfig(), device)
    per_expert = build_gpt_model(config_for(activation, False, *extra).model, ParallelConfig(), device)
    assert grouped.state_dict().keys() == per_expert.state_dict().keys()
    per_expert.load_state_dict(grouped.state_dict())
    assert all(type(m) is GroupedGemmSequentialMLP for m in experts_of(grouped))
    assert all(type(m) is SequentialMLP for m in experts_of(per_expert))
    return grouped, per_expert


def expert_linear_calls(model) -> list:
    """Grows by one entry at each forward of an expert's own linear layer."""
    calls = []
    for name, module in model.named_modules():
        if ".experts.local_experts." in name and name.endswith(("linear_fc1", "linear_fc2")):
            module.register_forward_hook(lambda *_, name=name: calls.append(name))
    return calls


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def assert_same_step(grouped, per_expert, batches):
    """Forward and backward of each batch in both models (gradients accumulate): equal logits and
    gradients, and only the per-expert model ran its experts' own linear layers."""
    calls_grouped, calls_per_expert = expert_linear_calls(grouped), expert_linear_calls(per_expert)
    for batch in batches:
        a, b = grouped(*batch), per_expert(*batch)
        assert same_bits(a, b)
        a.float().square().mean().backward()
        b.float().square().mean().backward()
    assert not calls_grouped and calls_per_expert
    reference = dict(per_expert.named_parameters())
    for name, param in grouped.named_parameters():
        other = reference[name].grad
        assert (param.grad is None) == (other is None), name
        assert param.grad is None or same_bits(param.grad, other), name


@ACTIVATIONS
def test_bf16_grouped_gemm_experts_equal_per_expert_experts(cpu_process, activation):
    grouped, per_expert = model_pair(activation)
    assert_same_step(grouped, per_expert, batches(count=2, seed=3))


@pytest.mark.parametrize("fmt", ["nvfp4", "nvfp4_4over6"])
@pytest.mark.parametrize("amax_mode", ["dynamic", "static"])
def test_nvfp4_student_of_grouped_gemm_experts_equals_the_per_expert_student(cpu_process, fmt, amax_mode):
    """Both students run their quantizers grouped; the grouped one also its GEMMs, over the stacked
    quantized weights (held across micro-batches). Calibration observes each expert on its own."""
    grouped, per_expert = model_pair("squared_relu")
    policy = dataclasses.replace(quantize.transformer(fmt), input_amax=amax_mode)
    for model in (grouped, per_expert):
        quantize.apply(model, policy)
        if amax_mode == "static":
            quantize.calibrate(model, batches(count=2))
    amaxes = dict(per_expert.named_buffers())
    assert all(same_bits(buffer, amaxes[name]) for name, buffer in grouped.named_buffers() if name.endswith("amax"))
    with quantize.reuse_quantized_weights(grouped), quantize.reuse_quantized_weights(per_expert):
        assert_same_step(grouped, per_expert, batches(count=3, seed=5))
        held = experts_of(grouped)[0].local_experts[0].linear_fc1.weight_quantizer._held
        assert held is not None and held[0][:2] == ("experts", True)  # the stacked group was held
    quantize.remove(grouped)
    assert all(type(m) is GroupedGemmSequentialMLP for m in experts_of(grouped))


def test_an_expert_routed_no_tokens_gets_a_zero_gradient(cpu_process):
    """Sigmoid routing with expert 1's selection bias far below the others': it gets no tokens."""
    grouped, per_expert = model_pair("squared_relu", "model.moe_router_score_function=sigmoid",
                                     "model.moe_router_enable_expert_bias=true")
    for model in (grouped, per_expert):
        for module in model.modules():
            if getattr(module, "expert_bias", None) is not None:
                module.expert_bias[1] = -1e4
    assert_same_step(grouped, per_expert, batches(count=2, seed=5))
    for layer in experts_of(grouped):
        expert = layer.local_experts[1]
        assert not expert.linear_fc1.weight.grad.any() and not expert.linear_fc2.weight.grad.any()


def test_where_the_grouped_gemm_does_not_apply_the_experts_run_one_by_one(cpu_process):
    """Biases, probabilities on the input and delayed weight gradients are SequentialMLP's own."""
    grouped, _ = model_pair("squared_relu")
    layer = experts_of(grouped)[0]
    x = torch.ones(4, grouped.config.hidden_size, dtype=torch.bfloat16)
    assert layer.grouped_gemm_applies(x) and not layer.grouped_gemm_applies(x[:0])
    for setting in ("add_bias_linear", "moe_apply_probs_on_input", "delay_wgrad_compute"):
        setattr(layer.config, setting, True)
        assert not layer.grouped_gemm_applies(x)
        setattr(layer.config, setting, False)


def _layout_rank(layout):
    """One rank of a 2-process layout: where this rank's experts can run the grouped GEMM, a BF16
    step and an NVFP4 student step of both models. Returns whether they can."""
    from megatron_qad import parallel

    config = config_for("squared_relu", True, f"parallel.{layout}=2")
    parallel.initialize(config.parallel, backend="gloo", seed=config.model.seed)
    try:
        build = [build_gpt_model(config_for("squared_relu", grouped_gemm, f"parallel.{layout}=2").model,
                                 config.parallel) for grouped_gemm in (True, False)]
        grouped, per_expert = build
        per_expert.load_state_dict(grouped.state_dict())
        x = torch.ones(4, grouped.config.hidden_size, dtype=torch.bfloat16)
        applies = experts_of(grouped)[0].grouped_gemm_applies(x)
        if applies:
            assert_same_step(grouped, per_expert, batches(count=2, seed=7))
            for model in build:
                model.zero_grad()
                quantize.apply(model, dataclasses.replace(quantize.transformer("nvfp4"), input_amax="dynamic"))
            assert_same_step(grouped, per_expert, batches(count=2, seed=8))
        return applies
    finally:
        parallel.destroy()


@pytest.mark.parametrize("layout", ["expert_model_parallel_size", "tensor_model_parallel_size"])
def test_grouped_gemm_experts_under_expert_and_tensor_parallelism(layout):
    """EP=2: each rank's two local experts run the grouped GEMM; TP=2: each rank's shards of all
    four experts' linear layers (expert TP = TP, sequence parallelism on). Either way the logits
    and gradients equal the per-expert model's, in BF16 and as NVFP4 students (the sharded
    weights' and fc2 inputs' amaxes MAX-reduced over the TP group)."""
    assert run_distributed(_layout_rank, 2, layout, timeout_s=300) == [True, True]


def test_hybrid_recipe_builds_grouped_gemm_experts_with_the_same_keys(cpu_process):
    """The tiny hybrid recipe (built on the CPU; its Mamba layers run forward only on a GPU)."""
    recipe = ROOT / "configs" / "tiny_hybrid_cpu.yaml"
    grouped = build_model(load_config(recipe, ["model.moe_grouped_gemm=true"]).model, ParallelConfig())
    per_expert = build_model(load_config(recipe, ["model.moe_grouped_gemm=false"]).model, ParallelConfig())
    assert experts_of(grouped) and all(type(m) is GroupedGemmSequentialMLP for m in experts_of(grouped))
    assert grouped.state_dict().keys() == per_expert.state_dict().keys()
    assert grouped.sharded_state_dict().keys() == per_expert.sharded_state_dict().keys()


@pytest.fixture(scope="module")
def gpu_process():
    with gpu_single_process() as context:
        yield context


@pytest.mark.gpu
def test_grouped_gemm_experts_on_a_gpu_are_as_close_to_fp64_as_the_per_expert_gemms(gpu_process):
    """One bf16 squared-ReLU expert layer called directly (an expert routed no tokens), grouped and
    per expert, against the same layer computed in fp64 from the same bf16 weights. Both paths
    accumulate in fp32 and round to bf16 after each GEMM and the activation, so their errors are of
    the same size; the grouped path's largest error (output, token and probability gradients) may
    be at most twice the per-expert path's (the factor 2 is the margin for the other summation order)."""
    grouped, _ = model_pair("squared_relu", device=gpu_process.device)
    layer = experts_of(grouped)[0]
    splits = [9, 0, 300, 51]
    generator = torch.Generator(device="cuda").manual_seed(11)
    hidden = torch.randn(sum(splits), grouped.config.hidden_size, generator=generator, device="cuda").bfloat16()
    probs = torch.rand(sum(splits), generator=generator, device="cuda")
    grad = torch.randn(sum(splits), grouped.config.hidden_size, generator=generator, device="cuda").bfloat16()

    def run(forward, dtype):
        x = hidden.to(dtype).requires_grad_()
        p = probs.to(dtype if dtype == torch.float64 else probs.dtype).requires_grad_()
        out = forward(x, p)
        out.backward(grad.to(out.dtype))
        return [t.double() for t in (out.detach(), x.grad, p.grad)]

    def fp64(x, p):
        pieces = []
        for expert, (tokens, weights) in enumerate(zip(torch.split(x, splits), torch.split(p, splits))):
            mlp = layer.local_experts[expert]
            h = torch.relu(tokens @ mlp.linear_fc1.weight.double().t()).square() * weights.unsqueeze(-1)
            pieces.append(h @ mlp.linear_fc2.weight.double().t())
        return torch.cat(pieces)

    reference = run(fp64, torch.float64)
    tokens = torch.tensor(splits)
    grouped_result = run(lambda x, p: layer(x, tokens, p)[0], torch.bfloat16)
    per_expert_result = run(lambda x, p: SequentialMLP.forward(layer, x, tokens, p)[0], torch.bfloat16)
    for what, g, e, r in zip(("output", "token gradient", "probability gradient"), grouped_result,
                             per_expert_result, reference):
        grouped_error, per_expert_error = (g - r).abs().max(), (e - r).abs().max()
        assert grouped_error <= 2 * per_expert_error, f"{what}: {grouped_error} vs per expert {per_expert_error}"
