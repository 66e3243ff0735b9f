"""QuantReport: what a policy did to a model, and where precision goes.

One row per linear layer (module, kind, weight / input format, parameters, relative squared error
of its weight under NVFP4 and under Four Over Six, using the layer's own tensor-parallel amax),
the totals over all parameters of this rank's model, and the number of attention modules whose
K / V go through FP8.
"""

from dataclasses import dataclass

import torch

from ..numerics import nvfp4
from . import layers

QUANTIZED_FORMATS = ("nvfp4", "nvfp4_4over6")


@dataclass(frozen=True)
class LayerRow:
    """One linear layer. params: elements of its weight on this rank. rel_mse_*: ``||fq(w) - w||^2 /
    ||w||^2`` (dimensionless) under NVFP4 / Four Over Six, or None for layers whose weight stays BF16."""

    name: str
    kind: str
    weight_format: str
    input_format: str
    params: int
    rel_mse_nvfp4: float | None
    rel_mse_4over6: float | None


@dataclass(frozen=True)
class QuantReport:
    """Rows, totals over every parameter of the model, and the policy's KV-cache coverage."""

    policy: str
    rows: list[LayerRow]
    total_params: int
    kv_fp8_modules: int

    @property
    def nvfp4_params(self) -> int:
        return sum(row.params for row in self.rows if row.weight_format in QUANTIZED_FORMATS)

    @property
    def nvfp4_share(self) -> float:
        """Fraction of all parameters held in NVFP4 weights."""
        return self.nvfp4_params / self.total_params if self.total_params else 0.0

    def mean_rel_mse(self) -> float:
        """Parameter-weighted relative squared error of the NVFP4 weights, each under its own format."""
        quantized = [row for row in self.rows if row.weight_format in QUANTIZED_FORMATS]
        if not quantized:
            return 0.0
        errors = [row.rel_mse_4over6 if row.weight_format == "nvfp4_4over6" else row.rel_mse_nvfp4
                  for row in quantized]
        return sum(row.params * error for row, error in zip(quantized, errors)) / sum(r.params for r in quantized)

    def format_table(self) -> str:
        """An aligned text table plus a summary line (no trailing newline)."""
        header = ("module", "kind", "weight", "input", "params", "rel MSE nvfp4", "rel MSE 4/6")
        cells = [header] + [
            (row.name, row.kind, row.weight_format, row.input_format, f"{row.params:,}",
             "-" if row.rel_mse_nvfp4 is None else f"{row.rel_mse_nvfp4:.3e}",
             "-" if row.rel_mse_4over6 is None else f"{row.rel_mse_4over6:.3e}")
            for row in self.rows]
        widths = [max(len(line[col]) for line in cells) for col in range(len(header))]

        def render(line):
            return "  ".join(cell.ljust(w) if col < 4 else cell.rjust(w)
                             for col, (cell, w) in enumerate(zip(line, widths))).rstrip()

        rule = "-" * len(render(header))
        summary = (f"policy {self.policy}: {self.nvfp4_params:,} of {self.total_params:,} parameters "
                   f"({100 * self.nvfp4_share:.1f}%) in NVFP4, weight rel MSE {self.mean_rel_mse():.3e} "
                   f"(parameter-weighted); K/V in FP8 in {self.kv_fp8_modules} attention modules")
        return "\n".join([render(header), rule, *map(render, cells[1:]), rule, summary])


def _relative_mse(weight: torch.Tensor, amax: torch.Tensor, four_over_six: bool) -> float:
    w = weight.detach()
    error = (nvfp4.fake_quantize(w, amax, four_over_six, check_finite=False).float() - w.float()).square()
    norm = w.float().square().sum(dtype=torch.float64)
    return float(error.sum(dtype=torch.float64) / norm) if norm > 0 else 0.0


def _mean_relative_mse(scaled: list[tuple[torch.Tensor, torch.Tensor]], four_over_six: bool) -> float:
    """Parameter-weighted mean of :func:`_relative_mse` over ``scaled`` = [(weight, fp32 0-d amax)]."""
    total = sum(weight.numel() for weight, _ in scaled)
    return sum(weight.numel() * _relative_mse(weight, amax, four_over_six) for weight, amax in scaled) / total


def build_report(model: torch.nn.Module, formats, policy) -> QuantReport:
    """The report of ``model`` after ``apply`` with ``formats`` = [(LinearModule, weight, input)].

    Weight errors use the amax the layer's weight quantizer would use (MAX-reduced over its
    tensor-parallel group), so every rank must build the report (``apply`` does). A grouped-GEMM
    expert layer is one row: its local experts' parameters, and the parameter-weighted mean of their
    errors (so the report's mean equals that of the same experts as per-expert layers).
    An output layer tied to the embedding (``share_embeddings_and_output_weights``) owns no weight:
    its row has 0 parameters and no weight error.
    """
    rows = []
    for linear, weight_format, input_format in formats:
        weights = [weight for weight in layers.gemm_weights(linear.module) if weight is not None]
        errors = (None, None)
        if weight_format in QUANTIZED_FORMATS and weights:
            scaled = [(weight, quantizer.current_amax(weight))
                      for weight, quantizer in zip(weights, layers.weight_quantizers(linear.module))]
            errors = (_mean_relative_mse(scaled, False), _mean_relative_mse(scaled, True))
        rows.append(LayerRow(linear.name, linear.kind, weight_format, input_format,
                             sum(weight.numel() for weight in weights), *errors))
    kv_modules = sum(1 for module in model.modules() if layers.has_kv_quantization(module))
    return QuantReport(policy=policy.name, rows=rows,
                       total_params=sum(p.numel() for p in model.parameters()), kv_fp8_modules=kv_modules)
