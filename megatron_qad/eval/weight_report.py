"""Per-weight NVFP4 quantization error of a megatron.core model, as rows and a printable table.

Each parameter gets a row with its module kind. Weights of linear layers in attention, dense MLPs,
routed experts and shared experts are the ones a ``transformer`` quantization policy puts in NVFP4:
for them the row holds the relative squared error ``||fq(w) - w||^2 / ||w||^2`` of NVFP4 fake
quantization, plain and Four Over Six. The router, embeddings, output layer, norms and biases stay
in BF16 (no error).

Weight layouts (megatron.core 0.19): ColumnParallelLinear / RowParallelLinear weights, including
each expert of a SequentialMLP and each ``weight{i}`` of Transformer Engine's GroupedLinear, are
[out, in]; a single grouped expert weight is those stacked, [experts, out, in]. The GEMM reduction
(K) dimension is always the last one, so blocks of 16 run along it, and every expert's matrix is
quantized on its own, with its own tensor scale.

Rows describe this rank's parameters: tensor-parallel shards and this rank's experts.
"""

from dataclasses import dataclass

import torch
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.transformer.attention import Attention
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.experts import SequentialMLP, TEGroupedMLP
from megatron.core.transformer.moe.router import Router
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP

from ..numerics import nvfp4

QUANTIZED_KINDS = ("attention", "mlp", "moe_expert", "shared_expert")
"""Kinds whose linear weights a ``transformer`` policy quantizes to NVFP4."""

# Checked from the outermost enclosing module inwards; SharedExpertMLP before its base class MLP.
_KIND_OF_ANCESTOR = (
    (LanguageModelEmbedding, "embedding"),
    (Router, "router"),
    (SharedExpertMLP, "shared_expert"),
    ((SequentialMLP, TEGroupedMLP), "moe_expert"),
    (Attention, "attention"),
    (MLP, "mlp"),
)


@dataclass(frozen=True)
class WeightRow:
    """One weight matrix (or one expert's matrix of a grouped weight) and its quantization error.

    name: parameter name, with ``[e]`` appended for expert ``e`` of a 3-D grouped weight.
    shape: the matrix shape, [out, in] for linear weights. numel: element count.
    rel_mse_nvfp4 / rel_mse_4over6: relative squared error of NVFP4 / Four Over Six fake
    quantization (dimensionless), or None for weights kept in BF16.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    numel: int
    rel_mse_nvfp4: float | None
    rel_mse_4over6: float | None

    @property
    def quantized(self) -> bool:
        """True for weights a ``transformer`` policy puts in NVFP4."""
        return self.rel_mse_nvfp4 is not None


@dataclass(frozen=True)
class ReportTotals:
    """Parameter counts, and errors averaged over the NVFP4 weights weighted by their numel."""

    total_params: int
    quantized_params: int
    mean_rel_mse_nvfp4: float
    mean_rel_mse_4over6: float

    @property
    def quantized_share(self) -> float:
        """Fraction of all parameters that are in NVFP4 weights (0 for an empty model)."""
        return self.quantized_params / self.total_params if self.total_params else 0.0


@dataclass(frozen=True)
class WeightReport:
    """The rows of :func:`weight_report` and their totals."""

    rows: list[WeightRow]
    totals: ReportTotals


def relative_mse(weight: torch.Tensor, four_over_six: bool) -> float:
    """``||fq(w) - w||^2 / ||w||^2`` for NVFP4 fake quantization of ``weight`` [..., K] in fp32.

    The weight (any float dtype) is upcast to fp32 exactly, quantized with its own tensor amax in
    blocks of 16 along the last dim, and compared in fp32 with float64 sums. 0 for an all-zero weight.
    """
    w = weight.detach().float()
    error = (nvfp4.fake_quantize(w, four_over_six=four_over_six) - w).square().sum(dtype=torch.float64)
    norm = w.square().sum(dtype=torch.float64)
    return float(error / norm) if norm > 0 else 0.0


def classify(model: torch.nn.Module) -> dict[str, str]:
    """Map each parameter name of ``model`` to its kind (see :data:`QUANTIZED_KINDS` and the module doc).

    Kinds: attention, mlp, moe_expert, shared_expert, router, embedding, output_layer, norm, or
    other for parameters outside these modules.
    """
    modules = dict(model.named_modules())
    output_layers = {id(m.output_layer) for m in modules.values()
                     if isinstance(getattr(m, "output_layer", None), torch.nn.Module)}
    kinds = {}
    for name, _ in model.named_parameters():
        owner_path = name.rpartition(".")[0]
        owner = modules[owner_path]
        if "norm" in type(owner).__name__.lower():
            kinds[name] = "norm"
            continue
        if id(owner) in output_layers:
            kinds[name] = "output_layer"
            continue
        parts = owner_path.split(".") if owner_path else []
        ancestors = [modules[".".join(parts[:depth])] for depth in range(len(parts) + 1)]
        kinds[name] = next((kind for module in ancestors for types, kind in _KIND_OF_ANCESTOR
                            if isinstance(module, types)), "other")
    return kinds


def _matrices(name: str, param: torch.Tensor):
    """(row name, matrix) pairs: the weight itself, or one per expert of a [experts, out, in] weight."""
    if param.dim() == 3:
        return [(f"{name}[{expert}]", param[expert]) for expert in range(param.shape[0])]
    return [(name, param)]


def weight_report(model: torch.nn.Module) -> WeightReport:
    """Quantization error of every NVFP4-eligible weight of ``model``; other parameters as BF16 rows."""
    kinds = classify(model)
    rows = []
    for name, param in model.named_parameters():
        kind = kinds[name]
        if kind in QUANTIZED_KINDS and param.dim() >= 2:
            rows += [WeightRow(row_name, kind, tuple(matrix.shape), matrix.numel(),
                               relative_mse(matrix, four_over_six=False),
                               relative_mse(matrix, four_over_six=True))
                     for row_name, matrix in _matrices(name, param)]
        else:
            rows.append(WeightRow(name, kind, tuple(param.shape), param.numel(), None, None))
    return WeightReport(rows=rows, totals=summarize(rows))


def summarize(rows: list[WeightRow]) -> ReportTotals:
    """Totals of ``rows``: parameter counts and numel-weighted mean errors of the NVFP4 rows."""
    quantized = [row for row in rows if row.quantized]
    n_quantized = sum(row.numel for row in quantized)

    def weighted_mean(errors):
        return sum(row.numel * e for row, e in zip(quantized, errors)) / n_quantized if n_quantized else 0.0

    return ReportTotals(
        total_params=sum(row.numel for row in rows),
        quantized_params=n_quantized,
        mean_rel_mse_nvfp4=weighted_mean([row.rel_mse_nvfp4 for row in quantized]),
        mean_rel_mse_4over6=weighted_mean([row.rel_mse_4over6 for row in quantized]),
    )


def format_table(rows: list[WeightRow]) -> str:
    """An aligned text table of ``rows`` plus a summary line (no trailing newline)."""
    header = ("module", "kind", "shape", "params", "rel MSE nvfp4", "rel MSE 4/6")
    cells = [header] + [
        (row.name, row.kind, "x".join(map(str, row.shape)), f"{row.numel:,}",
         f"{row.rel_mse_nvfp4:.3e}" if row.quantized else "bf16",
         f"{row.rel_mse_4over6:.3e}" if row.quantized else "bf16")
        for row in rows
    ]
    widths = [max(len(line[col]) for line in cells) for col in range(len(header))]
    left_aligned = 2  # module and kind read left to right; numbers line up on the right

    def render(line):
        return "  ".join(cell.ljust(w) if col < left_aligned else cell.rjust(w)
                         for col, (cell, w) in enumerate(zip(line, widths))).rstrip()

    rule = "-" * len(render(header))
    totals = summarize(rows)
    summary = (f"NVFP4 under a transformer policy: {totals.quantized_params:,} of {totals.total_params:,} "
               f"parameters ({100 * totals.quantized_share:.1f}%) in linear/expert layers; "
               f"parameter-weighted rel MSE nvfp4 {totals.mean_rel_mse_nvfp4:.3e}, "
               f"4/6 {totals.mean_rel_mse_4over6:.3e}")
    return "\n".join([render(header), rule, *map(render, cells[1:]), rule, summary])
