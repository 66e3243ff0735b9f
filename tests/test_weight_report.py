"""The NVFP4 weight report on real megatron.core models: coverage, kinds, values, and the table."""

from pathlib import Path

import pytest
import torch

from distributed_helpers import single_process
from megatron_qad.config import load_config
from megatron_qad.eval.weight_report import QUANTIZED_KINDS, format_table, weight_report
from megatron_qad.models import build_gpt_model
from megatron_qad.numerics import nvfp4

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"


def direct_relative_mse(weight: torch.Tensor, four_over_six: bool) -> float:
    w = weight.detach().float()
    return float((nvfp4.fake_quantize(w, four_over_six=four_over_six) - w).square().sum() / w.square().sum())


@pytest.fixture(scope="module")
def cpu_process():
    with single_process() as context:
        yield context


@pytest.fixture(scope="module")
def tiny_moe(cpu_process):
    config = load_config(TINY)
    model = build_gpt_model(config.model, config.parallel)
    return config.model, model, weight_report(model)


def expected_kinds(m, dense: bool) -> dict[str, str]:
    """Parameter name -> kind for the local-spec GPT of ``m``."""
    kinds = {"embedding.word_embeddings.weight": "embedding", "decoder.final_layernorm.weight": "norm",
             "output_layer.weight": "output_layer"}
    for layer in range(m.num_layers):
        p = f"decoder.layers.{layer}."
        kinds.update({p + "input_layernorm.weight": "norm", p + "pre_mlp_layernorm.weight": "norm",
                      p + "self_attention.linear_qkv.weight": "attention",
                      p + "self_attention.linear_proj.weight": "attention"})
        if dense:
            kinds.update({p + "mlp.linear_fc1.weight": "mlp", p + "mlp.linear_fc2.weight": "mlp"})
            continue
        kinds[p + "mlp.router.weight"] = "router"
        for e in range(m.num_moe_experts):
            kinds.update({p + f"mlp.experts.local_experts.{e}.linear_fc{i}.weight": "moe_expert"
                          for i in (1, 2)})
        kinds.update({p + f"mlp.shared_experts.linear_fc{i}.weight": "shared_expert" for i in (1, 2)})
    return kinds


def test_rows_cover_exactly_the_linear_and_expert_weights(tiny_moe):
    m, model, report = tiny_moe
    kinds = expected_kinds(m, dense=False)
    assert {row.name: row.kind for row in report.rows} == kinds
    quantized = {row.name for row in report.rows if row.quantized}
    assert quantized == {name for name, kind in kinds.items() if kind in QUANTIZED_KINDS}
    per_layer = 2 + 2 * m.num_moe_experts + 2  # qkv, proj; fc1, fc2 per expert; shared fc1, fc2
    assert len(quantized) == m.num_layers * per_layer
    for row in report.rows:
        if not row.quantized:
            assert row.kind in ("router", "embedding", "output_layer", "norm") and row.rel_mse_4over6 is None


def test_row_errors_equal_direct_fake_quantization(tiny_moe):
    _, model, report = tiny_moe
    params = dict(model.named_parameters())
    for row in filter(lambda r: r.quantized, report.rows):
        weight = params[row.name]
        assert row.shape == tuple(weight.shape) and row.numel == weight.numel()
        assert row.rel_mse_nvfp4 == pytest.approx(direct_relative_mse(weight, False), rel=1e-6)
        assert row.rel_mse_4over6 == pytest.approx(direct_relative_mse(weight, True), rel=1e-6)
        # Gaussian weights in NVFP4 lose about 1% of their energy.
        assert 1e-3 < row.rel_mse_nvfp4 < 3e-2


def test_four_over_six_is_no_worse_on_average(tiny_moe):
    totals = tiny_moe[2].totals
    assert totals.mean_rel_mse_4over6 <= totals.mean_rel_mse_nvfp4


def test_totals_weight_errors_by_parameter_count(tiny_moe):
    _, model, report = tiny_moe
    quantized = [row for row in report.rows if row.quantized]
    totals = report.totals
    assert totals.total_params == sum(p.numel() for p in model.parameters())
    assert totals.quantized_params == sum(row.numel for row in quantized)
    assert 0.8 < totals.quantized_share < 1.0
    expected = sum(row.numel * row.rel_mse_nvfp4 for row in quantized) / totals.quantized_params
    assert totals.mean_rel_mse_nvfp4 == pytest.approx(expected)


def test_stacked_expert_weight_is_quantized_one_expert_at_a_time(tiny_moe):
    """A [experts, out, in] weight (Transformer Engine's single grouped layout) gives one row per
    expert, each quantized along its own last (K) dim with its own tensor scale."""
    _, model, _ = tiny_moe
    experts = model.decoder.layers[0].mlp.experts
    stacked = torch.randn(3, 32, 64, generator=torch.Generator().manual_seed(0))
    stacked[1] *= 100.0  # a shared tensor scale would crush the other experts' blocks
    experts.register_parameter("stacked_weight", torch.nn.Parameter(stacked))
    try:
        rows = {row.name: row for row in weight_report(model).rows}
    finally:
        del experts.stacked_weight
    name = "decoder.layers.0.mlp.experts.stacked_weight"
    for e in range(3):
        row = rows[f"{name}[{e}]"]
        assert row.kind == "moe_expert" and row.shape == (32, 64)
        assert row.rel_mse_nvfp4 == pytest.approx(direct_relative_mse(stacked[e], False), rel=1e-6)


def test_dense_model_reports_mlp_weights(cpu_process):
    config = load_config(TINY, ["model.num_moe_experts=0", "model.num_layers=2"])
    report = weight_report(build_gpt_model(config.model, config.parallel))
    assert {row.name: row.kind for row in report.rows} == expected_kinds(config.model, dense=True)


def test_table_is_aligned_and_ends_with_the_summary(tiny_moe):
    _, _, report = tiny_moe
    lines = format_table(report.rows).splitlines()
    header, rule, *body, last_rule, summary = lines
    assert header.split() == ["module", "kind", "shape", "params", "rel", "MSE", "nvfp4", "rel", "MSE", "4/6"]
    assert rule == last_rule and set(rule) == {"-"}
    assert len(body) == len(report.rows)
    assert all(len(line) == len(rule) for line in [header, *body])
    assert body[0].split()[0] == report.rows[0].name and body[0].split()[-1] == "bf16"
    qkv = next(line for line in body if "layers.0.self_attention.linear_qkv" in line)
    assert qkv.split()[1:4] == ["attention", "256x128", "32,768"]
    assert summary.startswith("NVFP4 under a transformer policy:")
    assert f"{report.totals.quantized_params:,} of {report.totals.total_params:,} parameters" in summary
    assert f"nvfp4 {report.totals.mean_rel_mse_nvfp4:.3e}" in summary
