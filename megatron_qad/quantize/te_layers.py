"""The emulated NVFP4 forward of Transformer Engine linear layers (models built from a TE spec).

Transformer Engine's layers run their GEMM (and, in ``TELayerNormColumnParallelLinear``, the norm
in front of it) inside TE's own kernels, with no seam where a fake-quantized weight or input can
enter. A quantized TE layer therefore computes its forward the way megatron.core's local
``ColumnParallelLinear`` / ``RowParallelLinear`` do, with megatron.core's own functions
(``linear_with_grad_accumulation_and_async_allreduce`` and the tensor-parallel mappings), on
fake-quantized input and weight: the same values, bit for bit, as the local-spec student for the
same weights and input, under the same tensor and sequence parallelism. The module keeps its
parameters, names and checkpoint format; removing the hooks gives back TE's own forward.

The norm of ``TELayerNormColumnParallelLinear`` is computed as ``torch.nn.RMSNorm`` /
``LayerNorm`` compute it (the local spec's norms), per token, on this rank's sequence shard.

Grouped-GEMM experts (``TEGroupedMLP``) keep one weight per local expert in each of their two
``TEGroupedLinear`` layers (``weight0``, ``weight1``, ...). Quantized, such a layer has one input
and one weight quantizer per expert, and runs each expert's GEMM on that expert's tokens as the
expert's own linear layer in ``SequentialMLP`` does: the same values, amaxes and checkpoint keys
as the per-expert student. Outside calibration all experts' tokens are fake-quantized in one
kernel launch and all their weights in another (``quantize.grouped``), with the same values.

With ``quantization.backend: te`` (Blackwell) a quantized TE layer instead runs Transformer Engine's
own forward inside TE's ``autocast`` with the NVFP4 recipe of ``backend.te_recipe``
(:class:`NativeNVFP4`): its GEMMs on FP4 tensor cores. Its quantizers stay: they calibrate the static
input amaxes export writes, and give the report its weight errors.
"""

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import linear_with_grad_accumulation_and_async_allreduce
from megatron.core.tensor_parallel.mappings import (reduce_from_tensor_model_parallel_region,
                                                    reduce_scatter_to_sequence_parallel_region)
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint
from megatron.core.utils import get_pg_rank, get_pg_size

from ..grouped_experts import grouped_expert_gemm, grouped_mm_takes
from . import grouped
from .policy import PolicyError
from .quantizer import TensorQuantizer


def _te_extension():
    """megatron.core's Transformer Engine module, or None when Transformer Engine is missing (then
    megatron.core defines its TE classes as placeholders that no module is an instance of)."""
    from megatron.core.extensions import transformer_engine as extension

    return extension if extension.HAVE_TE else None


def te_linear_types() -> tuple[type, ...]:
    """Transformer Engine linear classes the hooks swap: ``TELinear`` (and its column / row
    parallel subclasses) and ``TELayerNormColumnParallelLinear``; empty without TE."""
    extension = _te_extension()
    return () if extension is None else (extension.TELinear, extension.TELayerNormColumnParallelLinear)


def te_grouped_linear_types() -> tuple[type, ...]:
    """``TEGroupedLinear`` (the column / row parallel per-expert GEMMs of ``TEGroupedMLP``); empty
    without TE."""
    extension = _te_extension()
    grouped = None if extension is None else getattr(extension, "TEGroupedLinear", None)
    return () if grouped is None else (grouped,)


def hooked_te_linear_types() -> tuple[type, ...]:
    """Every Transformer Engine linear class the hooks cover: :func:`te_linear_types` and
    :func:`te_grouped_linear_types`; empty without TE."""
    return te_linear_types() + te_grouped_linear_types()


def te_attention_types() -> tuple[type, ...]:
    """``TEDotProductAttention`` (where K and V get FP8 fake quant); empty without TE."""
    extension = _te_extension()
    return () if extension is None else (extension.TEDotProductAttention,)


def is_te_layernorm_linear(module: torch.nn.Module) -> bool:
    extension = _te_extension()
    return extension is not None and isinstance(module, extension.TELayerNormColumnParallelLinear)


def _check_te_config(module: torch.nn.Module, name: str) -> None:
    """Raise PolicyError for TransformerConfig settings of a TE layer the emulated forward cannot keep."""
    config = getattr(module, "config", None)
    for setting in ("fp8", "fp4"):
        if getattr(config, setting, None):
            raise PolicyError(f"{name}: the student is built with TransformerConfig.{setting}="
                              f"{getattr(config, setting)!r}, Transformer Engine's own low-precision "
                              f"training, which would quantize the NVFP4 student a second time; build "
                              f"the student without it ('quantization.backend' picks how NVFP4 runs)")
    if getattr(config, "delay_wgrad_compute", False) or getattr(module, "delay_wgrad_compute", False):
        raise PolicyError(f"{name}: delay_wgrad_compute defers weight gradients to Transformer Engine's "
                          f"backward_dw, past the straight-through estimator of the NVFP4 weight; build "
                          f"the student with delay_wgrad_compute=False (and "
                          f"overlap_dispatch_backward_with_experts_wgrad=False)")


def check_te_linear(module: torch.nn.Module, name: str) -> None:
    """Raise PolicyError for TE settings the emulated forward cannot reproduce."""
    if list(module.weight_names) != ["weight"]:
        raise PolicyError(f"{name}: a Transformer Engine linear with split parameters "
                          f"({module.weight_names}) cannot be quantized; build it with one weight")
    _check_te_config(module, name)
    if getattr(module, "return_layernorm_output", False):
        raise PolicyError(f"{name}: return_layernorm_output=True is not supported by the NVFP4 hooks")


def check_te_grouped_linear(module: torch.nn.Module, name: str) -> None:
    """Raise PolicyError for grouped-GEMM expert settings the per-expert emulated forward cannot keep."""
    if getattr(module, "single_grouped_weight", False) or getattr(module, "single_grouped_bias", False):
        raise PolicyError(f"{name}: its experts' weights are one grouped tensor (moe_single_grouped_weight / "
                          f"moe_single_grouped_bias), which cannot be quantized per expert; build the "
                          f"student with both False")
    if getattr(module.config, "use_transformer_engine_op_fuser", False):
        raise PolicyError(f"{name}: use_transformer_engine_op_fuser runs the experts in Transformer "
                          f"Engine's fused operations, past the layer's forward where NVFP4 enters; "
                          f"build the student with use_transformer_engine_op_fuser=False")
    _check_te_config(module, name)


def parallel_linear(module: torch.nn.Module, input_: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(output, output_bias)`` of the TE linear ``module`` computed as megatron.core's local
    column / row parallel linear computes it.

    input_: [s, b, in_features / tp] (row parallel) or [s / tp, b, in_features] (column parallel
    under sequence parallelism; [s, b, in_features] without), the parameters' dtype. weight:
    [out, in] of this rank; bias: its bias or None. TE's ``parallel_mode`` None (duplicated layers,
    and experts whose communication the token dispatcher does) is a plain GEMM.
    """
    mode, group, tp_size = module.parallel_mode, module.tp_group, module.tp_size
    sequence_parallel = module.sequence_parallel
    separate_bias = bias is not None and module.return_bias
    if mode == "column":
        # The input's gradient is all-reduced over TP inside the GEMM's backward, or (sequence
        # parallel) the input is all-gathered in front of it and its gradient reduce-scattered.
        allreduce_dgrad = tp_size > 1 and not sequence_parallel
        output = linear_with_grad_accumulation_and_async_allreduce(
            input_, weight, None if separate_bias else bias, gradient_accumulation_fusion=False,
            allreduce_dgrad=allreduce_dgrad, sequence_parallel=sequence_parallel, tp_group=group)
        return output, bias if separate_bias else None
    output = linear_with_grad_accumulation_and_async_allreduce(
        input_, weight, None if mode == "row" or separate_bias else bias, gradient_accumulation_fusion=False,
        allreduce_dgrad=False, sequence_parallel=False, tp_group=None)
    if mode == "row":
        if sequence_parallel:
            output = reduce_scatter_to_sequence_parallel_region(output, group=group)
        elif tp_size > 1:
            output = reduce_from_tensor_model_parallel_region(output, group=group)
        if bias is not None and not separate_bias:
            output = output + bias
    return output, bias if separate_bias else None


def te_norm(module: torch.nn.Module, input_: torch.Tensor) -> torch.Tensor:
    """The norm of a ``TELayerNormColumnParallelLinear`` over the last dim of ``input_``, as
    ``torch.nn.RMSNorm`` / ``LayerNorm`` (zero-centred gamma: ``1 + weight``) compute it."""
    weight = module.layer_norm_weight
    if module.zero_centered_gamma:
        weight = weight + 1
    shape = (input_.shape[-1],)
    if module.normalization == "RMSNorm":
        return F.rms_norm(input_, shape, weight, module.eps)
    if module.normalization == "LayerNorm":
        return F.layer_norm(input_, shape, weight, module.layer_norm_bias, module.eps)
    raise PolicyError(f"normalization {module.normalization!r} of a TELayerNormColumnParallelLinear is not "
                      f"supported by the NVFP4 hooks (RMSNorm, LayerNorm are)")


class QuantizedTELinear:
    """Mixin put in front of a Transformer Engine linear class (see ``layers.quantize_linear``):
    the emulated forward of the module docstring."""

    def _gemm_input(self, x: torch.Tensor) -> torch.Tensor:
        """What enters the GEMM: the layer's input itself."""
        return x

    def forward(self, x, *args, **kwargs):
        x = self._gemm_input(x)
        weight = self.weight
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        if self.weight_quantizer is not None:
            weight = self.weight_quantizer(weight)
        bias = self.bias if self.use_bias else None
        return parallel_linear(self, x, weight, bias)


class QuantizedTELayerNormLinear(QuantizedTELinear):
    """The mixin of ``TELayerNormColumnParallelLinear``: its norm (:func:`te_norm`) in front of the GEMM."""

    def _gemm_input(self, x: torch.Tensor) -> torch.Tensor:
        return te_norm(self, x)


def _token_counts(m_splits, num_gemms: int) -> list[int]:
    """The per-expert token counts ``m_splits`` (a list of ints or an int tensor on the host) as a
    list, one per local expert of a layer of ``num_gemms`` experts."""
    if isinstance(m_splits, torch.Tensor):
        m_splits = m_splits.tolist()
    if len(m_splits) != num_gemms:
        raise ValueError(f"{len(m_splits)} token counts for {num_gemms} experts")
    return m_splits


class QuantizedTEGroupedLinear:
    """Mixin put in front of ``TEGroupedLinear`` (see ``layers.quantize_linear``): per local expert
    ``i``, ``input_quantizers[i]`` and ``weight_quantizers[i]`` (ModuleLists, or None for a BF16
    role) fake-quantize the expert's tokens and ``weight{i}``, and its GEMM runs as
    :func:`parallel_linear`, the expert's local linear layer.

    Outside calibration the quantizers of a role run together (:mod:`.grouped`): all experts' tokens
    in one fake-quant launch and all their weights in another, each expert with its own amax, the
    same values as one quantizer per expert. ``expert_gemm`` then picks the GEMMs: "per_expert" (one
    per expert, the per-expert local layers' output bit for bit) or "grouped" (one grouped GEMM,
    ``torch.nn.functional.grouped_mm``, over the same quantized tokens and weights; fp32 accumulation
    in another order, so outputs may differ from "per_expert" in their last bits). "grouped" runs
    where it applies: no bias, no tensor parallelism inside the layer, bf16, widths multiples of 8,
    at least one token; elsewhere the per-expert GEMMs run.
    """

    input_quantizers: torch.nn.ModuleList | None
    weight_quantizers: torch.nn.ModuleList | None
    expert_gemm: str = "per_expert"

    def forward(self, x: torch.Tensor, m_splits):
        """x: [tokens, in_features] bf16, the local experts' tokens one expert after another;
        m_splits: the token count of each local expert (list of ints, or an int tensor on the host).
        Returns ``(output [tokens, out_features], biases)``: the per-expert biases as a list when the
        layer returns them apart (``return_bias``), else None, as TE's ``TEGroupedLinear`` does."""
        m_splits = _token_counts(m_splits, self.num_gemms)
        weights = [getattr(self, f"weight{expert}") for expert in range(self.num_gemms)]
        input_quantizers, weight_quantizers = self.input_quantizers, self.weight_quantizers
        if input_quantizers is not None and grouped.can_group(input_quantizers):
            x, input_quantizers = grouped.fake_quantize_tokens(input_quantizers, x, m_splits), None
        if weight_quantizers is not None and grouped.can_group(weight_quantizers):
            if input_quantizers is None and self._grouped_gemm_applies(x):
                stacked = grouped.fake_quantize_weights(weight_quantizers, weights, stacked=True)
                return grouped_expert_gemm(x, stacked, m_splits), None
            weights, weight_quantizers = grouped.fake_quantize_weights(weight_quantizers, weights), None
        return self._per_expert_forward(x, m_splits, weights, input_quantizers, weight_quantizers)

    def _grouped_gemm_applies(self, x: torch.Tensor) -> bool:
        """Whether ``expert_gemm: grouped`` asks for the grouped GEMM and it computes what
        :func:`parallel_linear` would (see the class docstring)."""
        return (self.expert_gemm == "grouped" and not self.use_bias and x.dim() == 2 and x.shape[0] > 0
                and (self.tp_size == 1 or self.parallel_mode is None) and grouped_mm_takes(x, (self.weight0,)))

    def _per_expert_forward(self, x, m_splits, weights, input_quantizers, weight_quantizers):
        """One :func:`parallel_linear` per expert; the quantizers given (None: already quantized)
        fake-quantize the expert's tokens and weight first."""
        outputs, biases = [], []
        for expert, tokens in enumerate(torch.split(x, m_splits)):
            weight = weights[expert]
            bias = getattr(self, f"bias{expert}") if self.use_bias else None
            if input_quantizers is not None:
                tokens = input_quantizers[expert](tokens)
            if weight_quantizers is not None:
                weight = weight_quantizers[expert](weight)
            output, output_bias = parallel_linear(self, tokens, weight, bias)
            outputs.append(output)
            biases.append(output_bias)
        return torch.cat(outputs), (biases if self.use_bias and self.return_bias else None)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """TE's per-expert tensors plus each expert's static input amax, under the sharded key of
        ``SequentialMLP``'s expert layers (``<prefix>input_quantizer.amax`` with the global expert
        axis), so either expert layout loads the other's checkpoint. TE's own builds its dict from
        a fixed list of names and would drop them."""
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        quantizers = self.input_quantizers
        if quantizers is None or quantizers[0].amax_mode != "static":
            return sharded
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        groups = self._pg_collection
        num_global_experts = get_pg_size(groups.ep) * self.num_gemms
        first_expert = get_pg_rank(groups.ep) * self.num_gemms
        for local_expert, quantizer in enumerate(quantizers):
            expert = first_expert + local_expert
            if metadata.get("singleton_local_shards", False):
                key_prefix, offsets = f"{expert}.{prefix}", sharded_offsets
            else:
                key_prefix, offsets = prefix, (*sharded_offsets, (len(sharded_offsets), expert, num_global_experts))
            (amax,) = make_sharded_tensors_for_checkpoint(
                {"input_quantizer.amax": quantizer.amax}, key_prefix, {}, offsets, tp_group=self._tp_group,
                dp_cp_group=metadata["dp_cp_group"]).values()
            # Replicated over the expert data-parallel group, as SequentialMLP marks its experts' tensors.
            amax.replica_id = (*amax.replica_id[:2], get_pg_rank(groups.expt_dp))
            sharded[f"{prefix}input_quantizers.{local_expert}.amax"] = amax
        return sharded


NATIVE_ROW_MULTIPLE = 32
"""Token rows TE's low-precision GEMMs need a multiple of (NVFP4: 32, FP8: 16). Expert layers get a
token count the router chose, so their rows are padded with zeros to it: zeros change neither a
per-tensor amax nor the other rows' 1 x 16 blocks, and their outputs are dropped."""


def _padded_rows(x: torch.Tensor) -> torch.Tensor:
    """x: [rows, features], with zero rows appended up to a multiple of :data:`NATIVE_ROW_MULTIPLE`."""
    return F.pad(x, (0, 0, 0, -x.shape[0] % NATIVE_ROW_MULTIPLE))


class NativeNVFP4:
    """Put in front of a quantized TE layer's mixin for ``quantization.backend: te``: outside
    calibration the layer runs Transformer Engine's own forward inside TE's ``autocast`` with
    ``native_recipe`` (its NVFP4 recipe), under an amax reduction over the layer's TP group; while
    its quantizers calibrate, the emulated mixin's forward (BF16 values, static amaxes observed)."""

    native_recipe: object

    def forward(self, *args, **kwargs):
        if any(isinstance(m, TensorQuantizer) and m.calibrating for m in self.modules()):
            return super().forward(*args, **kwargs)
        from transformer_engine.pytorch import autocast

        # TE keeps a layer's quantized weight from one call to the next unless told that a call is
        # the first micro-batch of a step, which megatron.core only does for its own FP8 / FP4
        # training: say so at every call, so each forward quantizes the current weight.
        self.is_first_microbatch = True
        with autocast(enabled=True, recipe=self.native_recipe, amax_reduction_group=self._tp_group):
            return self._native_forward(*args, **kwargs)

    def _native_forward(self, x: torch.Tensor, *args, **kwargs):
        """TE's own forward; a 2-D input ([tokens, features]: an expert's tokens) row-padded."""
        if x.dim() != 2:
            return self.original_class.forward(self, x, *args, **kwargs)
        output, bias = self.original_class.forward(self, _padded_rows(x), *args, **kwargs)
        return output[: x.shape[0]], bias


class NativeTELinear(NativeNVFP4, QuantizedTELinear):
    """Native NVFP4 ``TELinear`` (column / row parallel)."""


class NativeTELayerNormLinear(NativeNVFP4, QuantizedTELayerNormLinear):
    """Native NVFP4 ``TELayerNormColumnParallelLinear`` (TE's fused norm, then the NVFP4 GEMM)."""


class NativeTEGroupedLinear(NativeNVFP4, QuantizedTEGroupedLinear):
    """Native NVFP4 grouped-GEMM experts; the static input amaxes keep the per-expert checkpoint keys."""

    def _native_forward(self, x: torch.Tensor, m_splits):
        """TE's grouped forward with each expert's rows padded (see :data:`NATIVE_ROW_MULTIPLE`)."""
        m_splits = _token_counts(m_splits, self.num_gemms)
        padded = [_padded_rows(tokens) for tokens in torch.split(x, m_splits)]
        output, biases = self.original_class.forward(self, torch.cat(padded), [len(p) for p in padded])
        pieces = torch.split(output, [len(p) for p in padded])
        return torch.cat([piece[:rows] for piece, rows in zip(pieces, m_splits)]), biases


def quantized_te_mixin(module: torch.nn.Module, native: bool = False) -> type:
    """The mixin that quantizes the Transformer Engine linear ``module`` (one of
    :func:`te_linear_types` or :func:`te_grouped_linear_types`): emulated, or ``native`` NVFP4."""
    if isinstance(module, te_grouped_linear_types()):
        return NativeTEGroupedLinear if native else QuantizedTEGroupedLinear
    if is_te_layernorm_linear(module):
        return NativeTELayerNormLinear if native else QuantizedTELayerNormLinear
    return NativeTELinear if native else QuantizedTELinear
