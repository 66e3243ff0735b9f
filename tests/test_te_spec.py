"""On a GPU with Transformer Engine: TE-spec students get the local spec's NVFP4 numerics.

Each Transformer Engine linear layer, quantized, must give the local-spec layer's output and
gradients bit for bit for the same weights and input (the emulated forward of
``megatron_qad.quantize.te_layers``); whole TE-spec models (GPT-MoE with shared expert, the tiny
recipe) quantize every layer the local spec quantizes, agree with the local-spec student up to the
attention kernels, train through megatron.core's schedule, pass K / V to ``TEDotProductAttention``
as FP8 values, and write checkpoints that the local spec (which export builds) loads. Grouped-GEMM
experts (``TEGroupedLinear``, their tokens and weights fake-quantized one launch per role) equal
per-expert local layers bit for bit, and a student built with them equals the per-expert
(SequentialMLP) student, trains, and saves the per-expert checkpoint; with ``expert_gemm =
"grouped"`` (one grouped GEMM) they stay within fp32 summation error of the per-expert GEMMs and train.
"""

import importlib
import re

from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
pytest.importorskip("transformer_engine.pytorch", reason="needs Transformer Engine")

from megatron.core.extensions.transformer_engine import (TEColumnParallelGroupedLinear,  # noqa: E402
                                                         TEColumnParallelLinear, TEDotProductAttention,
                                                         TELayerNormColumnParallelLinear,
                                                         TERowParallelGroupedLinear, TERowParallelLinear)
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear  # noqa: E402

from megatron_qad import models, parallel, quantize  # noqa: E402
from megatron_qad.config import load_config  # noqa: E402
from megatron_qad.distill import DistillationLoss, TeacherStudentStage, distillation_step, sum_reports  # noqa: E402
from megatron_qad.numerics.formats import E4M3_MAX  # noqa: E402
from megatron_qad.quantize import grouped as grouped_quant, layers  # noqa: E402
from megatron_qad.quantize.policy import PolicyError  # noqa: E402
from megatron_qad.quantize.te_layers import QuantizedTEGroupedLinear, QuantizedTELinear  # noqa: E402
from megatron_qad.train import checkpointing  # noqa: E402

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml")
OVERRIDES = ["model.params_dtype=bfloat16", "model.seq_length=64", "quantization.input_amax=dynamic"]
TE = ["model.transformer_impl=transformer_engine"]


@pytest.fixture(scope="module")
def gpu_parallel():
    config = load_config(TINY, OVERRIDES)
    context = parallel.initialize(config.parallel, backend="nccl", seed=config.model.seed)
    yield context
    parallel.destroy()


def _layer_pair(kind: str, bias: bool, skip_bias_add: bool):
    """(local layer, local norm or None, TE layer) with the same bf16 weights on the GPU."""
    recipe = load_config(TINY, OVERRIDES)
    config = models.transformer_config(recipe.model, recipe.parallel, torch.device("cuda"))
    n_in, n_out = 256, 96
    common = dict(config=config, init_method=config.init_method, bias=bias, skip_bias_add=skip_bias_add)
    norm = None
    if kind == "row":
        local = RowParallelLinear(n_in, n_out, input_is_parallel=True, **common)
        te = TERowParallelLinear(n_in, n_out, input_is_parallel=True, is_expert=False, **common)
    else:
        local = ColumnParallelLinear(n_in, n_out, gather_output=False, **common)
        te_class = TELayerNormColumnParallelLinear if kind == "layernorm_column" else TEColumnParallelLinear
        te = te_class(n_in, n_out, gather_output=False, is_expert=False, **common)
    generator = torch.Generator(device="cuda").manual_seed(3)
    with torch.no_grad():
        local.weight.copy_(torch.randn(local.weight.shape, generator=generator, device="cuda") * 0.05)
        te.weight.copy_(local.weight)
        if bias:
            local.bias.copy_(torch.randn(local.bias.shape, generator=generator, device="cuda"))
            te.bias.copy_(local.bias)
        if kind == "layernorm_column":
            norm = models.sequence_parallel_torch_norm(config, n_in, eps=config.layernorm_epsilon).cuda()
            norm.weight.copy_(1 + 0.2 * torch.randn(n_in, generator=generator, device="cuda"))
            te.layer_norm_weight.copy_(norm.weight)
    return local, norm, te


def _forward_backward(module, x, grad, norm=None):
    x = x.detach().clone().requires_grad_(True)
    output, output_bias = module(norm(x) if norm is not None else x)
    output.backward(grad)
    return output.detach(), output_bias, x.grad


@pytest.mark.parametrize("weight_format", ["nvfp4", "nvfp4_4over6"])
@pytest.mark.parametrize("bias, skip_bias_add", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("kind", ["column", "row", "layernorm_column"])
def test_te_linear_matches_local_linear_bit_for_bit(gpu_parallel, kind, bias, skip_bias_add, weight_format):
    local, norm, te = _layer_pair(kind, bias, skip_bias_add)
    generator = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(16, 2, 256, generator=generator, device="cuda").to(torch.bfloat16)
    grad = torch.randn(16, 2, 96, generator=generator, device="cuda").to(torch.bfloat16)
    unquantized, _, _ = _forward_backward(te, x, grad)
    te.zero_grad()
    for name, module in (("local", local), ("te", te)):
        layers.quantize_linear(module, name, weight_format, weight_format, "dynamic")
    local_out, local_bias, local_dx = _forward_backward(local, x, grad, norm)
    te_out, te_bias, te_dx = _forward_backward(te, x, grad)
    assert torch.equal(te_out, local_out)
    assert not torch.equal(te_out, unquantized), "the quantized TE layer computed the unquantized output"
    assert (te_bias is None) == (local_bias is None) == (not skip_bias_add)
    if skip_bias_add:
        assert torch.equal(te_bias, local_bias)
    assert torch.equal(te_dx, local_dx)
    assert torch.equal(te.weight.grad, local.weight.grad)
    if bias and not skip_bias_add:  # a skipped bias is returned, not used: it gets no gradient here
        assert torch.equal(te.bias.grad, local.bias.grad)
    if norm is not None:
        assert torch.equal(te.layer_norm_weight.grad, norm.weight.grad)
    layers.unquantize_linear(te)
    assert torch.equal(_forward_backward(te, x, grad)[0], unquantized), "remove() restores TE's own forward"


# The tiny recipe's layers are MoE layers, whose pre-MLP norm TE keeps apart: only the norm in
# front of QKV is fused, into linear_qkv as ``layer_norm_weight``.
_LOCAL_NORM, _TE_NORM = ".input_layernorm.weight", ".self_attention.linear_qkv.layer_norm_weight"


def _local_to_te_names(state: dict) -> dict:
    """A local-spec GPT-MoE state dict under the TE spec's names."""
    return {name.replace(_LOCAL_NORM, _TE_NORM): value for name, value in state.items()}


def _te_to_local_names(state: dict) -> dict:
    """A TE-spec GPT-MoE state dict under the local spec's names (the inverse of :func:`_local_to_te_names`)."""
    return {name.replace(_TE_NORM, _LOCAL_NORM): value for name, value in state.items()}


def _model_pair():
    local_cfg, te_cfg = load_config(TINY, OVERRIDES), load_config(TINY, OVERRIDES + TE)
    local = models.build_gpt_model(local_cfg.model, local_cfg.parallel, "cuda")
    te = models.build_gpt_model(te_cfg.model, te_cfg.parallel, "cuda")
    missing, unexpected = te.load_state_dict(_local_to_te_names(local.state_dict()), strict=False)
    assert not unexpected and all(name.endswith("_extra_state") for name in missing), (missing, unexpected)
    return local_cfg, local, te


def _batch(model_cfg, count: int = 1):
    generator = torch.Generator().manual_seed(11)
    shape = (2, model_cfg.seq_length)
    return [{"tokens": torch.randint(0, model_cfg.vocab_size, shape, generator=generator).cuda(),
             "labels": torch.randint(0, model_cfg.vocab_size, shape, generator=generator).cuda(),
             "loss_mask": torch.ones(shape, device="cuda")} for _ in range(count)]


def _logits(model, batch, seq_length):
    positions = torch.arange(seq_length, device="cuda").expand(batch["tokens"].shape[0], -1)
    with torch.no_grad():
        return model(batch["tokens"], positions, models.causal_attention_mask(seq_length, "cuda")).float()


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean over tokens of KL(softmax(p) || softmax(q)), nats."""
    p = torch.log_softmax(p_logits, -1)
    return (p.exp() * (p - torch.log_softmax(q_logits, -1))).sum(-1).mean().item()


def test_te_spec_student_quantizes_like_the_local_spec_student(gpu_parallel):
    """The same layers quantize with the same fake-quantized weights, and the TE student is as far
    from its teacher as the local student is from its own. Whole models agree only up to that: TE's
    attention and norm kernels differ from the local spec's at BF16 rounding level (the teachers'
    KL is ~1e-6), and NVFP4 rounding turns such noise into whole-step flips of a few percent of the
    elements, so the two students differ by a sizeable part of the quantization KL; the per-layer
    test above is the bit-for-bit check."""
    cfg, local, te = _model_pair()
    (batch,) = _batch(cfg.model)
    seq = cfg.model.seq_length
    local_teacher, te_teacher = _logits(local, batch, seq), _logits(te, batch, seq)
    policy = cfg.quantization.to_policy()
    local_report, te_report = quantize.apply(local, policy), quantize.apply(te, policy)

    def quantized(model):
        return {name: module for name, module in model.named_modules() if layers.is_quantized_linear(module)}

    local_linears, te_linears = quantized(local), quantized(te)
    assert set(te_linears) == set(local_linears) and len(te_linears) > 0
    for name, module in te_linears.items():
        assert isinstance(module, QuantizedTELinear), name
        assert torch.equal(module.weight_quantizer(module.weight), local_linears[name].weight_quantizer(
            local_linears[name].weight)), name
    attention = [m for m in te.modules() if isinstance(m, TEDotProductAttention)]
    assert attention and all(layers.has_kv_quantization(m) for m in attention)
    assert [(row.name, row.weight_format) for row in te_report.rows] == \
        [(row.name, row.weight_format) for row in local_report.rows]
    assert te_report.nvfp4_params == local_report.nvfp4_params and te_report.kv_fp8_modules == len(attention)

    local_student, te_student = _logits(local, batch, seq), _logits(te, batch, seq)
    local_kl, te_kl = _kl(local_teacher, local_student), _kl(te_teacher, te_student)
    print(f"KL(teacher || student): local spec {local_kl:.3e}, TE spec {te_kl:.3e}; between the specs: "
          f"teachers {_kl(local_teacher, te_teacher):.3e}, students {_kl(local_student, te_student):.3e}")
    assert local_kl > 1e-4
    assert 0.5 < te_kl / local_kl < 2


def test_te_spec_qad_step_trains_the_student_only(gpu_parallel):
    cfg, _, te_teacher = _model_pair()
    te_cfg = load_config(TINY, OVERRIDES + TE)
    student = models.build_gpt_model(te_cfg.model, te_cfg.parallel, "cuda")
    student.load_state_dict(te_teacher.state_dict())
    te_teacher.requires_grad_(False)
    quantize.apply(student, cfg.quantization.to_policy())
    batches = _batch(cfg.model, count=2)
    reports = distillation_step(TeacherStudentStage(student, te_teacher), iter(batches), 2, 2,
                                cfg.model.seq_length, DistillationLoss("kl"))
    kl_sum, tokens = sum_reports(reports)["kl"]
    assert tokens.item() == 2 * 2 * cfg.model.seq_length and 0 < kl_sum.item() < float("inf")
    grads = {name: p.grad for name, p in student.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for name, g in grads.items() if "weight" in name
               and "router" not in name), [n for n, g in grads.items() if g is None]
    assert all(p.grad is None for p in te_teacher.parameters())


def _e4m3_reference(x: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 round trip of ``x`` with its own amax, written out: scale 448 / amax in fp32."""
    scale = torch.tensor(E4M3_MAX, dtype=torch.float32, device=x.device) / x.abs().amax().float()
    codes = (x.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return (codes.float() / scale).to(x.dtype)


def test_fp8_kv_values_enter_te_attention(gpu_parallel):
    """With dynamic amaxes, K and V reach TE's attention as their FP8 round trip."""
    cfg, _, te = _model_pair()
    quantize.apply(te, cfg.quantization.to_policy())
    core = next(m for m in te.modules() if isinstance(m, TEDotProductAttention))
    entering, received = [], []
    core.register_forward_pre_hook(lambda module, args: entering.append((args[1].detach(), args[2].detach())))
    original_class = type(core).original_class
    original_forward = original_class.forward

    def spy(self, query, key, value, *args, **kwargs):
        if self is core:
            received.append((key.detach(), value.detach()))
        return original_forward(self, query, key, value, *args, **kwargs)

    original_class.forward = spy
    try:
        (batch,) = _batch(cfg.model)
        _logits(te, batch, cfg.model.seq_length)
    finally:
        original_class.forward = original_forward
    assert len(entering) == len(received) == 1
    for raw, quantized in zip(entering[0], received[0]):
        assert torch.equal(quantized, _e4m3_reference(raw))
        assert not torch.equal(quantized, raw)


def _grouped_pair(kind: str, bias: bool, skip_bias_add: bool, experts: int = 3):
    """(per-expert local layers, TE grouped layer of ``experts`` GEMMs) with the same bf16 weights."""
    recipe = load_config(TINY, OVERRIDES)
    config = models.transformer_config(recipe.model, recipe.parallel, torch.device("cuda"))
    n_in, n_out = 256, 96
    common = dict(config=config, init_method=config.init_method, bias=bias, skip_bias_add=skip_bias_add,
                  is_expert=True)
    if kind == "row":
        local = [RowParallelLinear(n_in, n_out, input_is_parallel=True, **common) for _ in range(experts)]
        grouped = TERowParallelGroupedLinear(experts, n_in, n_out, **common)
    else:
        local = [ColumnParallelLinear(n_in, n_out, gather_output=False, **common) for _ in range(experts)]
        grouped = TEColumnParallelGroupedLinear(experts, n_in, n_out, **common)
    generator = torch.Generator(device="cuda").manual_seed(5)
    with torch.no_grad():
        for expert, layer in enumerate(local):
            scale = 0.05 + expert / 50  # experts of different ranges
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator, device="cuda") * scale)
            getattr(grouped, f"weight{expert}").copy_(layer.weight)
            if bias:
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator, device="cuda"))
                getattr(grouped, f"bias{expert}").copy_(layer.bias)
    return local, grouped


def _run_local_experts(local, x, splits):
    """(output, per-expert output biases or None) of per-expert layers on the tokens ``x`` split as
    ``splits`` (the grouped layer's ``forward(x, splits)`` returns the same)."""
    results = [layer(tokens) for layer, tokens in zip(local, torch.split(x, splits))]
    return torch.cat([out for out, _ in results]), (None if results[0][1] is None else [b for _, b in results])


def _experts_forward_backward(run, x, grad):
    """(output, output biases, input gradient) of ``run(x)`` and a backward pass of ``grad``."""
    x = x.detach().clone().requires_grad_(True)
    output, biases = run(x)
    output.backward(grad)
    return output.detach(), biases, x.grad


@pytest.mark.parametrize("input_amax", ["dynamic", "static"])
@pytest.mark.parametrize("weight_format", ["nvfp4", "nvfp4_4over6"])
@pytest.mark.parametrize("bias, skip_bias_add", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("kind", ["column", "row"])
def test_grouped_expert_layer_matches_per_expert_local_layers_bit_for_bit(gpu_parallel, kind, bias, skip_bias_add,
                                                                          weight_format, input_amax):
    """Each expert's tokens and weight get their own scales, as in SequentialMLP's expert layers; an
    expert routed no tokens gives no rows (and a static amax of 0)."""
    local, grouped = _grouped_pair(kind, bias, skip_bias_add)
    splits = [5, 0, 11]
    generator = torch.Generator(device="cuda").manual_seed(6)
    x = torch.randn(16, 256, generator=generator, device="cuda").to(torch.bfloat16)
    x[:5] *= 4  # experts see inputs of different ranges
    grad = torch.randn(16, 96, generator=generator, device="cuda").to(torch.bfloat16)

    def run_grouped(tokens):
        return grouped(tokens, splits)

    def run_local(tokens):
        return _run_local_experts(local, tokens, splits)

    unquantized, _, _ = _experts_forward_backward(run_grouped, x, grad)
    grouped.zero_grad()
    for expert, layer in enumerate(local):
        layers.quantize_linear(layer, f"local{expert}", weight_format, weight_format, input_amax)
    layers.quantize_linear(grouped, "grouped", weight_format, weight_format, input_amax)
    assert isinstance(grouped, QuantizedTEGroupedLinear) and len(layers.weight_quantizers(grouped)) == 3
    if input_amax == "static":
        for model, run in ((torch.nn.ModuleList(local), run_local), (grouped, run_grouped)):
            with quantize.calibration(model), torch.no_grad():
                run(x)
        for layer, quantizer in zip(local, grouped.input_quantizers):
            assert torch.equal(quantizer.amax, layer.input_quantizer.amax)
        assert grouped.input_quantizers[1].amax.item() == 0 and grouped.input_quantizers[0].amax.item() > 0
    local_out, local_biases, local_dx = _experts_forward_backward(run_local, x, grad)
    grouped_out, grouped_biases, grouped_dx = _experts_forward_backward(run_grouped, x, grad)
    assert torch.equal(grouped_out, local_out)
    assert not torch.equal(grouped_out, unquantized), "the quantized grouped layer computed the unquantized output"
    assert (grouped_biases is None) == (local_biases is None) == (not skip_bias_add)
    if skip_bias_add:
        assert all(torch.equal(g, l) for g, l in zip(grouped_biases, local_biases))
    assert torch.equal(grouped_dx, local_dx)
    for expert, layer in enumerate(local):
        assert torch.equal(getattr(grouped, f"weight{expert}").grad, layer.weight.grad), expert
        if bias and not skip_bias_add:
            assert torch.equal(getattr(grouped, f"bias{expert}").grad, layer.bias.grad), expert
    layers.unquantize_linear(grouped)
    assert torch.equal(_experts_forward_backward(run_grouped, x, grad)[0], unquantized)


@pytest.mark.parametrize("input_amax", ["dynamic", "static"])
@pytest.mark.parametrize("weight_format", ["nvfp4", "nvfp4_4over6"])
@pytest.mark.parametrize("kind", ["column", "row"])
def test_grouped_expert_gemm_matches_the_per_expert_gemms_within_fp32_summation_error(gpu_parallel, kind,
                                                                                     weight_format, input_amax):
    """``expert_gemm = "grouped"``: one grouped GEMM over the same quantized tokens and weights as
    the per-expert GEMMs. Both sum K bf16 products in fp32, in different orders, and round to bf16,
    so each output (and gradient) element may differ by at most one bf16 ulp (2^-7 relative) plus
    twice the fp32 summation bound K * 2^-24 * sum |a * b| (derived, not measured; the factor 2 is
    the margin). The expert routed no tokens gets a zero weight gradient."""
    _, layer = _grouped_pair(kind, bias=False, skip_bias_add=False)
    splits = [5, 0, 11]
    generator = torch.Generator(device="cuda").manual_seed(6)
    x = torch.randn(16, 256, generator=generator, device="cuda").to(torch.bfloat16)
    x[:5] *= 4
    grad = torch.randn(16, 96, generator=generator, device="cuda").to(torch.bfloat16)
    layers.quantize_linear(layer, "grouped", weight_format, weight_format, input_amax)
    if input_amax == "static":
        with quantize.calibration(layer), torch.no_grad():
            layer(x, splits)

    def run(tokens):
        return layer(tokens, splits)

    def weight_grads():
        grads = [getattr(layer, f"weight{e}").grad.clone() for e in range(3)]
        layer.zero_grad()
        return grads

    per_expert_out, _, per_expert_dx = _experts_forward_backward(run, x, grad)
    per_expert_dw = weight_grads()
    layer.expert_gemm = "grouped"
    grouped_out, grouped_biases, grouped_dx = _experts_forward_backward(run, x, grad)
    grouped_dw = weight_grads()
    assert grouped_biases is None

    with torch.no_grad():
        xq = grouped_quant.fake_quantize_tokens(layer.input_quantizers, x, splits).float()
        wq = [w.float() for w in grouped_quant.fake_quantize_weights(layer.weight_quantizers,
                                                                     [getattr(layer, f"weight{e}") for e in range(3)])]

    def assert_within(actual, expected, magnitudes, terms, what):
        bound = 2.0**-7 * torch.maximum(actual.float().abs(), expected.float().abs()) + 2 * terms * 2.0**-24 * magnitudes
        excess = (actual.float() - expected.float()).abs() - bound
        assert excess.max() <= 0, f"{what}: exceeds the bound by {excess.max().item()}"

    pieces, grads = torch.split(xq.abs(), splits), torch.split(grad.float().abs(), splits)
    output_terms = torch.cat([p @ w.abs().t() for p, w in zip(pieces, wq)])
    assert_within(grouped_out, per_expert_out, output_terms, 256, "output")
    assert_within(grouped_dx, per_expert_dx, torch.cat([g @ w.abs() for g, w in zip(grads, wq)]), 96, "input gradient")
    for expert in range(3):
        terms = grads[expert].t() @ pieces[expert]
        assert_within(grouped_dw[expert], per_expert_dw[expert], terms, max(splits[expert], 1), f"weight{expert} gradient")
    assert not grouped_dw[1].any()


GROUPED = ["model.moe_grouped_gemm=true"]
_GROUPED_NAME = re.compile(r"(\.mlp\.experts)\.(linear_fc[12])\.(weight|input_quantizers\.)(\d+)(\.amax)?$")


def _per_expert_name(name: str) -> str:
    """The SequentialMLP name of a grouped-GEMM expert tensor (``...experts.linear_fc1.weight3`` ->
    ``...experts.local_experts.3.linear_fc1.weight``, ``...input_quantizers.3.amax`` ->
    ``...local_experts.3.linear_fc1.input_quantizer.amax``); other names unchanged."""
    match = _GROUPED_NAME.search(name)
    if not match:
        return name
    scope, layer, role, expert, _ = match.groups()
    suffix = "weight" if role == "weight" else "input_quantizer.amax"
    return f"{name[:match.start()]}{scope}.local_experts.{expert}.{layer}.{suffix}"


def _grouped_to_local_names(state: dict) -> dict:
    """A TE-spec grouped-GEMM state dict under the local spec's names (per-expert experts, the
    unfused norm); TE's ``_extra_state`` entries dropped."""
    return {_per_expert_name(name).replace(_TE_NORM, _LOCAL_NORM): value for name, value in state.items()
            if "_extra_state" not in name}


def _grouped_model_pair():
    """(recipe, TE-spec model with per-expert SequentialMLP, TE-spec model with grouped-GEMM
    experts), the same weights."""
    cfg = load_config(TINY, OVERRIDES + TE)
    per_expert = models.build_gpt_model(cfg.model, cfg.parallel, "cuda")
    grouped_cfg = load_config(TINY, OVERRIDES + TE + GROUPED)
    grouped = models.build_gpt_model(grouped_cfg.model, grouped_cfg.parallel, "cuda")
    source = {name: value for name, value in per_expert.state_dict().items() if "_extra_state" not in name}
    names = {name: _per_expert_name(name) for name in grouped.state_dict() if "_extra_state" not in name}
    assert set(names.values()) == source.keys(), set(names.values()) ^ source.keys()
    missing, unexpected = grouped.load_state_dict({name: source[per_expert_name]
                                                   for name, per_expert_name in names.items()}, strict=False)
    assert not unexpected and all("_extra_state" in name for name in missing), (missing, unexpected)
    return grouped_cfg, per_expert, grouped


def test_grouped_gemm_student_equals_the_per_expert_student(gpu_parallel):
    """Same weights, same quantized logits bit for bit; the report counts the same NVFP4 parameters
    and weight error; both move the same way under one QAD step's gradients."""
    cfg, per_expert, grouped = _grouped_model_pair()
    (batch,) = _batch(cfg.model)
    seq = cfg.model.seq_length
    policy = cfg.quantization.to_policy()
    per_expert_report, grouped_report = quantize.apply(per_expert, policy), quantize.apply(grouped, policy)
    grouped_layers = [m for m in grouped.modules() if isinstance(m, QuantizedTEGroupedLinear)]
    assert len(grouped_layers) == 2 * cfg.model.num_layers
    assert grouped_report.nvfp4_params == per_expert_report.nvfp4_params
    assert grouped_report.mean_rel_mse() == pytest.approx(per_expert_report.mean_rel_mse(), rel=1e-12)
    per_expert_logits, grouped_logits = _logits(per_expert, batch, seq), _logits(grouped, batch, seq)
    assert torch.equal(grouped_logits, per_expert_logits), (grouped_logits - per_expert_logits).abs().max()


@pytest.mark.parametrize("expert_gemm", ["per_expert", "grouped"])
def test_grouped_gemm_qad_step_trains_every_expert(gpu_parallel, expert_gemm):
    cfg, _, teacher = _grouped_model_pair()
    student = models.build_gpt_model(cfg.model, cfg.parallel, "cuda")
    student.load_state_dict(teacher.state_dict())
    teacher.requires_grad_(False)
    quantize.apply(student, cfg.quantization.to_policy())
    for module in student.modules():
        if isinstance(module, QuantizedTEGroupedLinear):
            module.expert_gemm = expert_gemm
    reports = distillation_step(TeacherStudentStage(student, teacher), iter(_batch(cfg.model, count=2)), 2, 2,
                                cfg.model.seq_length, DistillationLoss("kl"))
    kl_sum, _ = sum_reports(reports)["kl"]
    assert 0 < kl_sum.item() < float("inf")
    expert_weights = {name: p for name, p in student.named_parameters()
                      if re.search(r"linear_fc[12]\.weight\d+$", name)}
    assert len(expert_weights) == 2 * cfg.model.num_layers * cfg.model.num_moe_experts
    for name, weight in expert_weights.items():
        assert weight.grad is not None and torch.isfinite(weight.grad).all() and weight.grad.any(), name


def test_a_grouped_gemm_checkpoint_loads_into_the_per_expert_local_spec(gpu_parallel, tmp_path):
    """A calibrated grouped-GEMM student's dist checkpoint: every expert's weight and static input
    amax arrives in the local spec's SequentialMLP (what export builds) under its per-expert name, and
    a grouped student loads it back unchanged (resume)."""
    cfg, _, grouped = _grouped_model_pair()
    static = load_config(TINY, [*OVERRIDES, *TE, *GROUPED, "quantization.input_amax=static"])
    quantize.apply(grouped, static.quantization.to_policy())
    with quantize.calibration(grouped):
        _logits(grouped, _batch(cfg.model)[0], cfg.model.seq_length)
    amaxes = [q.amax for m in grouped.modules() if isinstance(m, QuantizedTEGroupedLinear) for q in m.input_quantizers]
    assert len(amaxes) == 2 * cfg.model.num_layers * cfg.model.num_moe_experts
    assert len({float(a) for a in amaxes}) > 1, "experts should see different inputs"
    checkpointing.save_model([grouped], tmp_path / "grouped")

    local_cfg = load_config(TINY, [*OVERRIDES, "quantization.input_amax=static"])
    local = models.build_gpt_model(local_cfg.model, local_cfg.parallel, "cuda")
    quantize.apply(local, local_cfg.quantization.to_policy())
    checkpointing.load_model([local], tmp_path / "grouped")
    expected = _grouped_to_local_names(grouped.state_dict())
    loaded = {name: value for name, value in local.state_dict().items() if not name.endswith("_extra_state")}
    assert expected.keys() == loaded.keys()
    for name, value in expected.items():
        assert torch.equal(loaded[name], value), name

    again = models.build_gpt_model(cfg.model, cfg.parallel, "cuda")
    quantize.apply(again, static.quantization.to_policy())
    checkpointing.load_model([again], tmp_path / "grouped")
    resumed = again.state_dict()
    for name, value in grouped.state_dict().items():
        if "_extra_state" not in name:
            assert torch.equal(resumed[name], value), name


def test_grouped_gemm_settings_the_hooks_cannot_keep_are_refused(gpu_parallel):
    cfg = load_config(TINY, OVERRIDES + TE + GROUPED)
    model = models.build_gpt_model(cfg.model, cfg.parallel, "cuda")
    grouped = next(m for m in model.modules() if isinstance(m, TEColumnParallelGroupedLinear))
    grouped.config.use_transformer_engine_op_fuser = True  # as TEGroupedMLP's fused path would be built
    with pytest.raises(PolicyError, match="use_transformer_engine_op_fuser=False"):
        quantize.apply(model, cfg.quantization.to_policy())
    assert not any(layers.is_quantized_linear(m) for m in model.modules()), "nothing changes before the refusal"


def test_a_te_spec_checkpoint_loads_into_the_local_spec_that_export_builds(gpu_parallel, tmp_path):
    """A calibrated TE-spec student's dist checkpoint loads, strictly, into a quantized local-spec
    model: every weight, norm (fused or, the MoE pre-MLP norm, apart) and amax arrives under its
    local name, unchanged; and the local model's checkpoint loads back into a TE-spec student."""
    cfg, _, te = _model_pair()
    static = load_config(TINY, [*OVERRIDES, *TE, "quantization.input_amax=static"])
    quantize.apply(te, static.quantization.to_policy())
    with quantize.calibration(te):
        _logits(te, _batch(cfg.model)[0], cfg.model.seq_length)
    checkpointing.save_model([te], tmp_path / "te")
    local_cfg = load_config(TINY, [*OVERRIDES, "quantization.input_amax=static"])
    local = models.build_gpt_model(local_cfg.model, local_cfg.parallel, "cuda")
    quantize.apply(local, local_cfg.quantization.to_policy())
    checkpointing.load_model([local], tmp_path / "te")

    expected = {name: value for name, value in _te_to_local_names(te.state_dict()).items()
                if not name.endswith("_extra_state")}
    loaded = {name: value for name, value in local.state_dict().items() if not name.endswith("_extra_state")}
    assert expected.keys() == loaded.keys()
    for name, value in expected.items():
        assert torch.equal(loaded[name], value), name
    assert any(name.endswith("input_quantizer.amax") for name in loaded)
    assert any(name.endswith("key_quantizer.amax") for name in loaded)

    checkpointing.save_model([local], tmp_path / "local")
    back = models.build_gpt_model(static.model, static.parallel, "cuda")
    quantize.apply(back, static.quantization.to_policy())
    checkpointing.load_model([back], tmp_path / "local")
    returned = {name: value for name, value in _te_to_local_names(back.state_dict()).items()
                if not name.endswith("_extra_state")}
    assert returned.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(returned[name], value), name


# quantization.backend: te. No GPU here has FP4 tensor cores, so TE's FP8 current-scaling recipe
# stands in for its NVFP4 recipe: the mechanism (TE's own forward under the recipe, the weight
# quantized again after every change, calibration on the BF16 values) is the same.
def _stand_in_recipe():
    from transformer_engine.common.recipe import Float8CurrentScaling

    return Float8CurrentScaling()


@pytest.mark.parametrize("kind", ["column", "row", "layernorm_column", "grouped"])
def test_native_layers_run_te_own_forward_under_the_recipe(gpu_parallel, kind):
    from transformer_engine.pytorch import autocast

    from megatron_qad.quantize.te_layers import te_norm

    def pair():
        if kind == "grouped":
            return _grouped_pair("column", False, False)[1]
        return _layer_pair(kind, False, False)[2]

    native, reference = pair(), pair()  # the same weights (seeded)
    reference.disable_parameter_transpose_cache = True  # TE's plain semantics: no weight cache
    generator = torch.Generator(device="cuda").manual_seed(7)
    if kind == "grouped":
        x = torch.randn(64, 256, generator=generator, device="cuda").to(torch.bfloat16)
        args = ([16, 16, 32],)
    else:
        x = torch.randn(16, 2, 256, generator=generator, device="cuda").to(torch.bfloat16)
        args = ()
    recipe = _stand_in_recipe()

    def reference_output():
        with autocast(enabled=True, recipe=recipe):
            return reference(x, *args)[0]

    bf16 = native(x, *args)[0].detach()
    layers.quantize_linear(native, "native", "nvfp4", "nvfp4", "static", native_recipe=recipe)
    assert layers.is_native_linear(native) and layers.is_quantized_linear(native)
    with quantize.calibration(native), torch.no_grad():  # calibration runs on the BF16 values
        torch.testing.assert_close(native(x, *args)[0], bf16, rtol=2e-2, atol=2e-2)
    gemm_input = te_norm(native, x) if kind == "layernorm_column" else x
    quantizers = native.input_quantizers if kind == "grouped" else [native.input_quantizer]
    if kind == "grouped":
        expected = [chunk.abs().max().float() for chunk in torch.split(gemm_input, args[0])]
    else:
        expected = [gemm_input.abs().max().float()]
    assert all(torch.equal(q.amax, e) for q, e in zip(quantizers, expected))

    output = native(x, *args)[0]
    assert torch.equal(output, reference_output()) and not torch.equal(output, bf16)
    with torch.no_grad():  # an optimizer step: the next forward quantizes the new weight
        for name, weight in native.named_parameters():
            if name.startswith("weight"):
                weight.add_(0.01)
                dict(reference.named_parameters())[name].add_(0.01)
    output = native(x, *args)[0]
    assert torch.equal(output, reference_output())
    if kind == "grouped":  # token counts TE's kernels cannot take: zero rows pad each expert to 32
        tokens, splits = x[:16], [5, 0, 11]
        padded = torch.cat([torch.nn.functional.pad(t, (0, 0, 0, -len(t) % 32)) for t in torch.split(tokens, splits)])
        with autocast(enabled=True, recipe=recipe):
            expected = reference(padded, [32, 0, 32])[0]
        assert torch.equal(native(tokens, splits)[0], torch.cat([expected[:5], expected[32:43]]))
    output.float().square().sum().backward()
    weights = [p for name, p in native.named_parameters() if name.startswith("weight")]
    assert all(w.grad is not None and torch.isfinite(w.grad).all() and w.grad.any() for w in weights)
    layers.unquantize_linear(native)
    assert not hasattr(native, "native_recipe") and not layers.is_quantized_linear(native)


def test_native_backend_student_trains(gpu_parallel, monkeypatch):
    """``apply(..., backend="te")``: every quantized TE layer runs natively with the recipe that
    ``te_recipe`` gives its format (here the stand-in); the student's QAD step trains."""
    apply_module = importlib.import_module("megatron_qad.quantize.apply")  # the package's `apply` is the function

    recipes = []

    def stand_in(weight_format):
        recipes.append(weight_format)
        return _stand_in_recipe()

    monkeypatch.setattr(apply_module, "te_recipe", stand_in)
    cfg, _, teacher = _model_pair()
    te_cfg = load_config(TINY, OVERRIDES + TE)
    student = models.build_gpt_model(te_cfg.model, te_cfg.parallel, "cuda")
    student.load_state_dict(teacher.state_dict())
    teacher.requires_grad_(False)
    report = quantize.apply(student, cfg.quantization.to_policy(), backend="te")
    assert recipes == ["nvfp4"]
    quantized = [m for m in student.modules() if layers.is_quantized_linear(m)]
    assert quantized and all(layers.is_native_linear(m) for m in quantized)
    assert report.nvfp4_params > 0
    (batch,) = _batch(cfg.model)
    seq = cfg.model.seq_length
    assert not torch.equal(_logits(student, batch, seq), _logits(teacher, batch, seq))
    reports = distillation_step(TeacherStudentStage(student, teacher), iter(_batch(cfg.model, count=2)), 2, 2,
                                seq, DistillationLoss("kl"))
    kl_sum, _ = sum_reports(reports)["kl"]
    assert 0 < kl_sum.item() < float("inf")
    assert all(p.grad is None for p in teacher.parameters())


def test_native_backend_refuses_a_weight_only_rule(gpu_parallel):
    cfg = load_config(TINY, OVERRIDES + TE)
    model = models.build_gpt_model(cfg.model, cfg.parallel, "cuda")
    policy = quantize.policy_from_dict({"policy": None, "rules": [{"kinds": ["attention"], "weight": "nvfp4",
                                                                   "input": "bf16"}]})
    with pytest.raises(PolicyError, match="quantizes a GEMM's weight and input alike.*make the rule's input 'nvfp4'"):
        quantize.apply(model, policy, backend="te")
    assert not any(layers.is_quantized_linear(m) for m in model.modules())
