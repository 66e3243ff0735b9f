"""What quantize.apply + calibrate compute, checked against a reference built without the package.

The reference is the unquantized tiny GPT-MoE built from the same seed, whose linear weights (of
the kinds the transformer policy quantizes) are replaced by ``nvfp4.fake_quantize(w)`` and whose
linear inputs and core-attention K / V are fake-quantized by plain forward pre-hooks written here,
with the amaxes the quantized model calibrated. Everything runs in fp32 on the CPU, in one process.
"""

from pathlib import Path

import pytest
import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.dot_product_attention import DotProductAttention

from distributed_helpers import single_process
from model_helpers import make_batches
from megatron_qad import quantize
from megatron_qad.config import load_config
from megatron_qad.models import build_gpt_model
from megatron_qad.numerics import fp8, nvfp4

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
SMALL = ["model.params_dtype=float32", "model.num_layers=2", "model.seq_length=32"]
QUANTIZED_KINDS = ("self_attention.linear_qkv", "self_attention.linear_proj", ".linear_fc1", ".linear_fc2")


@pytest.fixture(scope="module")
def config():
    return load_config(TINY, SMALL)


@pytest.fixture(scope="module")
def cpu_process(config):
    with single_process(config.parallel, seed=config.model.seed) as context:
        yield context


def linear_names(model) -> list[str]:
    return [name for name, module in model.named_modules()
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear))]


def expected_quantized_linears(model) -> list[str]:
    """Names of the linears the transformer policy quantizes: attention, routed and shared experts."""
    names = [name for name in linear_names(model) if name.startswith("decoder.layers.")]
    assert all(name.endswith(QUANTIZED_KINDS) for name in names)
    return names


def core_attention_names(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, DotProductAttention)]


def observe_input_amax(model, batches) -> dict[str, torch.Tensor]:
    """max |x| of every linear input and of K and V entering core attention over ``batches``, seen
    by forward pre-hooks on the unquantized ``model``, keyed like the quantizers' amax buffers."""
    seen: dict[str, torch.Tensor] = {}

    def record(key, tensor):
        amax = tensor.detach().abs().amax().float()
        seen[key] = torch.maximum(seen[key], amax) if key in seen else amax

    handles = []
    modules = dict(model.named_modules())
    for name in expected_quantized_linears(model):
        handles.append(modules[name].register_forward_pre_hook(
            lambda module, args, key=f"{name}.input_quantizer.amax": record(key, args[0])))
    for name in core_attention_names(model):
        def record_kv(module, args, name=name):
            record(f"{name}.key_quantizer.amax", args[1])
            record(f"{name}.value_quantizer.amax", args[2])
        handles.append(modules[name].register_forward_pre_hook(record_kv))
    with torch.no_grad():
        for batch in batches:
            model(*batch)
    for handle in handles:
        handle.remove()
    return seen


def make_reference(model, amaxes: dict[str, torch.Tensor] | None):
    """Turn the unquantized ``model`` into the hand-written NVFP4 reference, in place: weights
    replaced by their NVFP4 fake quant (per-tensor amax = max |w|), inputs and K / V fake-quantized
    by pre-hooks with ``amaxes`` (None: max |x| of each call, the dynamic mode)."""
    modules = dict(model.named_modules())

    def amax_of(key, tensor):
        return tensor.detach().abs().amax().float() if amaxes is None else amaxes[key]

    with torch.no_grad():
        for name in expected_quantized_linears(model):
            module = modules[name]
            module.weight.copy_(nvfp4.fake_quantize(module.weight))

            def quantize_input(module, args, key=f"{name}.input_quantizer.amax"):
                return (nvfp4.fake_quantize(args[0], amax_of(key, args[0])), *args[1:])
            module.register_forward_pre_hook(quantize_input)
    for name in core_attention_names(model):
        def quantize_kv(module, args, name=name):
            query, key, value, *rest = args
            return (query, fp8.fake_quantize_e4m3(key, amax_of(f"{name}.key_quantizer.amax", key)),
                    fp8.fake_quantize_e4m3(value, amax_of(f"{name}.value_quantizer.amax", value)), *rest)
        modules[name].register_forward_pre_hook(quantize_kv)
    return model


def amax_buffers(model) -> dict[str, torch.Tensor]:
    return {key: value for key, value in model.state_dict().items() if key.endswith(".amax")}


@pytest.fixture(scope="module")
def calibrated(cpu_process, config):
    """The quantized tiny model calibrated on two batches, and its report."""
    model = build_gpt_model(config.model, config.parallel)
    report = quantize.apply(model, "transformer")
    assert quantize.calibrate(model, make_batches(config.model)) == 2
    return model, report


def test_calibrated_amax_is_the_max_abs_input_over_the_batches(calibrated, config):
    model, _ = calibrated
    observed = observe_input_amax(build_gpt_model(config.model, config.parallel), make_batches(config.model))
    amaxes = amax_buffers(model)
    assert amaxes.keys() == observed.keys()
    assert len(amaxes) == config.model.num_layers * (2 + 2 * config.model.num_moe_experts + 2 + 2)
    for key, amax in amaxes.items():
        assert amax.dtype == torch.float32 and amax.shape == ()
        assert torch.equal(amax, observed[key]), key
    # The max over both batches, not the last one's.
    last_only = observe_input_amax(build_gpt_model(config.model, config.parallel), make_batches(config.model)[1:])
    assert any(not torch.equal(amaxes[key], last_only[key]) for key in amaxes)


def test_calibrated_forward_equals_the_hand_written_reference(calibrated, config):
    model, _ = calibrated
    batch = make_batches(config.model, count=1, seed=1)[0]  # not a calibration batch
    reference = make_reference(build_gpt_model(config.model, config.parallel), amax_buffers(model))
    unquantized = build_gpt_model(config.model, config.parallel)
    with torch.no_grad():
        logits = model(*batch)
        expected = reference(*batch)
        bf16_logits = unquantized(*batch)
    # The same fp32 operations in the same order on the same values: bit-identical.
    assert torch.equal(logits, expected)
    assert (logits - bf16_logits).abs().max() > 1e-2  # and the quantization is really there


def test_dynamic_input_amax_forward_equals_the_hand_written_reference(cpu_process, config):
    model = build_gpt_model(config.model, config.parallel)
    policy = quantize.Policy(rules=quantize.transformer().rules, input_amax="dynamic")
    quantize.apply(model, policy)
    assert amax_buffers(model) == {}  # dynamic quantizers keep no amax
    batch = make_batches(config.model, count=1, seed=1)[0]
    reference = make_reference(build_gpt_model(config.model, config.parallel), None)
    with torch.no_grad():
        assert torch.equal(model(*batch), reference(*batch))


def test_uncalibrated_static_quantizer_names_the_module_and_calibrate(cpu_process, config):
    model = build_gpt_model(config.model, config.parallel)
    quantize.apply(model, "transformer")
    with pytest.raises(RuntimeError, match=r"decoder\.layers\.0\.self_attention\.linear_qkv\.input.*"
                                           r"not calibrated.*calibrate\(model, batches\)"):
        with torch.no_grad():
            model(*make_batches(config.model, count=1)[0])


def test_calibration_block_without_a_forward_pass_is_an_error(cpu_process, config):
    model = build_gpt_model(config.model, config.parallel)
    quantize.apply(model, "transformer")
    with pytest.raises(ValueError, match="calibration saw no forward pass"):
        with quantize.calibration(model):
            pass
    with pytest.raises(RuntimeError, match="not calibrated"):
        with torch.no_grad():
            model(*make_batches(config.model, count=1)[0])


def test_calibration_block_equals_calibrate_on_a_list_of_chunks(calibrated, cpu_process, config):
    model, _ = calibrated
    chunk = build_gpt_model(config.model, config.parallel)
    quantize.apply([chunk], "transformer")
    with quantize.calibration([chunk]), torch.no_grad():
        for batch in make_batches(config.model):
            chunk(*batch)
    assert amax_buffers(chunk).keys() == amax_buffers(model).keys()
    for key, value in amax_buffers(chunk).items():
        assert torch.equal(value, amax_buffers(model)[key]), key


def test_a_quantizer_that_sees_no_tokens_passes_an_empty_tensor(cpu_process):
    """An expert that the router gave no token gets an empty [0, K] input; a dynamic amax of it is 0."""
    linear = torch.nn.Linear(32, 8, bias=False)
    quantizer = quantize.TensorQuantizer("nvfp4", "dynamic", owner="expert")
    empty = torch.zeros(0, 32, requires_grad=True)
    out = quantizer(empty)
    assert out.shape == (0, 32) and quantizer.current_amax(empty).item() == 0.0
    linear(out).sum().backward()
    assert empty.grad.shape == (0, 32)


def test_gradients_reach_the_student_weights_straight_through(calibrated, config):
    model, _ = calibrated
    reference = make_reference(build_gpt_model(config.model, config.parallel), amax_buffers(model))
    batch = make_batches(config.model, count=1, seed=1)[0]
    for m in (model, reference):
        m.zero_grad(set_to_none=True)
        m(*batch).float().square().mean().backward()
    reference_params = dict(reference.named_parameters())
    quantized = {f"{name}.weight" for name in expected_quantized_linears(model)}
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        # d loss / d W of the student is d loss / d fq(W) of the reference: the fake quant of the
        # weight passes the gradient unchanged; the same holds for every other parameter.
        assert torch.equal(param.grad, reference_params[name].grad), name
        if name in quantized:
            assert param.grad.abs().max() > 0, name
    model.zero_grad(set_to_none=True)


def relative_squared_error(weight: torch.Tensor, four_over_six: bool) -> float:
    w = weight.detach().double()
    fq = nvfp4.fake_quantize(weight.detach(), four_over_six=four_over_six).double()
    return float((fq - w).square().sum() / w.square().sum())


def test_quant_report_rows_totals_and_table(calibrated, config):
    model, report = calibrated
    modules = dict(model.named_modules())
    assert [row.name for row in report.rows] == linear_names(model)  # every linear, module order
    quantized = set(expected_quantized_linears(model))
    assert quantized == {row.name for row in report.rows if row.weight_format == "nvfp4"}
    for row in report.rows:
        weight = modules[row.name].weight
        assert row.params == weight.numel()
        if row.name in quantized:
            assert (row.weight_format, row.input_format) == ("nvfp4", "nvfp4")
            # The report squares fp32 differences, this check squares fp64 ones: ~1e-7 apart.
            assert row.rel_mse_nvfp4 == pytest.approx(relative_squared_error(weight, False), rel=1e-6)
            assert row.rel_mse_4over6 == pytest.approx(relative_squared_error(weight, True), rel=1e-6)
            assert 0 < row.rel_mse_4over6 < row.rel_mse_nvfp4 < 0.05
        else:
            assert row.name == "output_layer" and row.kind == "output_layer"
            assert (row.weight_format, row.rel_mse_nvfp4, row.rel_mse_4over6) == ("bf16", None, None)
    kinds = {row.name: row.kind for row in report.rows}
    assert kinds["decoder.layers.1.self_attention.linear_qkv"] == "attention"
    assert kinds["decoder.layers.1.mlp.experts.local_experts.3.linear_fc2"] == "moe_expert"
    assert kinds["decoder.layers.1.mlp.shared_experts.linear_fc1"] == "shared_expert"

    nvfp4_params = sum(modules[name].weight.numel() for name in quantized)
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert report.nvfp4_params == nvfp4_params
    assert report.nvfp4_share == pytest.approx(nvfp4_params / report.total_params, rel=1e-12)
    assert 0.5 < report.nvfp4_share < 1
    assert report.kv_fp8_modules == config.model.num_layers
    assert report.policy == "transformer"

    table = report.format_table()
    for row in report.rows:
        assert row.name in table
    assert f"{report.nvfp4_params:,} of {report.total_params:,} parameters" in table
    assert f"K/V in FP8 in {config.model.num_layers} attention modules" in table
