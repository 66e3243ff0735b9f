"""The hooks: NVFP4 fake quant inside Megatron linear layers, FP8 fake quant of K and V.

Linear layers: the module's class is swapped for a subclass that fake-quantizes the input and the
weight where both enter the GEMM, ``_forward_impl(input, weight, ...)``, the one seam that
ColumnParallelLinear and RowParallelLinear share. The input there is this rank's part (a sequence
shard under sequence parallelism, a K shard in RowParallelLinear); NVFP4 blocks run along K, so
with a tensor-parallel MAX-reduced amax every rank quantizes its part exactly as the unsplit tensor
would be. Parameters, their names and megatron.core's own forward stay as they are, so the model
trains, saves and loads like the original; the quantizers add ``input_quantizer.amax`` buffers.

K / V: core attention's class is swapped the same way; the subclass passes FP8 E4M3 fake quant
of ``key`` and ``value`` (per-tensor amax each) to the original forward.

Transformer Engine layers (TE-spec models) get the same quantizers; their linear layers have no
``_forward_impl`` seam, so :mod:`.te_layers` gives them megatron.core's local forward on the
fake-quantized operands, and ``TEDotProductAttention`` takes the K / V mixin as it is. Grouped-GEMM
experts (``TEGroupedLinear``) get one input and one weight quantizer per expert
(``input_quantizers``, ``weight_quantizers``). With a native recipe (``quantization.backend: te``)
a TE layer runs Transformer Engine's own NVFP4 GEMMs instead (``te_layers.NativeNVFP4``).

The local spec's ``SequentialMLP`` experts keep a quantized linear layer each; their
``SequentialMLP`` runs those layers' quantizers grouped (:mod:`.grouped_mlp`) and hands each layer
its operands already fake-quantized (:func:`given_operands`).
"""

import contextlib
from collections.abc import Iterator

import torch
from megatron.core import parallel_state
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from .quantizer import TensorQuantizer
from .policy import PolicyError
from .te_layers import (NativeNVFP4, QuantizedTEGroupedLinear, QuantizedTELinear, check_te_grouped_linear,
                        check_te_linear, hooked_te_linear_types, quantized_te_mixin, te_grouped_linear_types,
                        te_linear_types)


class QuantizedLinear:
    """Mixin put in front of a Megatron linear class (see :func:`quantize_linear`)."""

    input_quantizer: TensorQuantizer | None
    weight_quantizer: TensorQuantizer | None
    given_weight: torch.Tensor | None = None  # set by given_operands

    def _forward_impl(self, input, weight, *args, **kwargs):
        if self.given_weight is not None:
            return super()._forward_impl(input, self.given_weight, *args, **kwargs)
        if self.input_quantizer is not None:
            input = self.input_quantizer(input)
        if self.weight_quantizer is not None:
            weight = self.weight_quantizer(weight)
        return super()._forward_impl(input, weight, *args, **kwargs)


@contextlib.contextmanager
def given_operands(linear: QuantizedLinear, weight: torch.Tensor) -> Iterator[None]:
    """Inside the block the GEMM of ``linear`` (a quantized local linear layer) takes its input as
    already fake-quantized and ``weight`` ([out, in] of this rank, already fake-quantized, or the
    layer's own weight where it stays BF16) in place of its weight: its quantizers do not run, its
    forward and tensor-parallel communication stay megatron.core's."""
    linear.given_weight = weight
    try:
        yield
    finally:
        del linear.given_weight


_QUANTIZED_CLASSES: dict[tuple[type, type], type] = {}


def _quantized_class(cls: type, mixin: type) -> type:
    """The subclass of ``cls`` with ``mixin`` in front (made once per pair, so isinstance and
    pickling see one class); ``original_class`` leads back to ``cls``."""
    if (cls, mixin) not in _QUANTIZED_CLASSES:
        _QUANTIZED_CLASSES[cls, mixin] = type(f"Quantized{cls.__name__}", (mixin, cls),
                                              {"__module__": __name__, "original_class": cls})
    return _QUANTIZED_CLASSES[cls, mixin]


def data_parallel_group(is_expert: bool):
    """The group that holds replicas of a (expert) layer, or None outside megatron.core's parallel state."""
    if not parallel_state.model_parallel_is_initialized():
        return None
    if is_expert:
        return parallel_state.get_expert_data_parallel_group()
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def check_quantizable(module: torch.nn.Module, name: str) -> None:
    """Raise PolicyError for a Transformer Engine linear layer whose settings the hooks cannot keep
    (see :mod:`.te_layers`); megatron.core's local layers pass."""
    if isinstance(module, te_grouped_linear_types()):
        check_te_grouped_linear(module, name)
    elif isinstance(module, te_linear_types()):
        check_te_linear(module, name)


def quantize_linear(module: torch.nn.Module, name: str, weight_format: str, input_format: str,
                    input_amax: str, native_recipe=None) -> None:
    """Make ``module`` (Column/RowParallelLinear, or a Transformer Engine linear: see
    :mod:`.te_layers`) fake-quantize its weight and input in place.

    Formats: "nvfp4", "nvfp4_4over6" or "bf16" (not quantized). input_amax: "static" or "dynamic".
    native_recipe: a Transformer Engine recipe (``backend.te_recipe``) to run a TE layer's GEMM in
    natively instead (``quantization.backend: te``); None emulates.
    """
    check_quantizable(module, name)
    grouped = isinstance(module, te_grouped_linear_types())
    is_te = is_te_linear(module)
    if native_recipe is not None and not is_te:
        raise PolicyError(f"{name}: native NVFP4 GEMMs run in Transformer Engine layers; this is "
                          f"megatron.core's local {type(module).__name__}")
    if is_te:
        # megatron.core's TP group of the layer (the expert TP group for experts, whose TE layers
        # get none of their own); experts' parameters are reduced over the expert DP group.
        tp_group = module._tp_group
        is_expert = grouped or not getattr(module.weight, "allreduce", True)
        mixin = quantized_te_mixin(module, native=native_recipe is not None)
    else:
        tp_group, is_expert = getattr(module, "tp_group", None), getattr(module, "is_expert", False)
        mixin = QuantizedLinear
    dp_group = data_parallel_group(is_expert)
    device = gemm_weights(module)[0].device
    module.__class__ = _quantized_class(type(module), mixin)
    if native_recipe is not None:
        module.native_recipe = native_recipe

    def weight_quantizer(owner: str) -> TensorQuantizer:
        return TensorQuantizer(weight_format, "dynamic", tp_group, owner=owner)

    def input_quantizer(owner: str) -> TensorQuantizer:
        return TensorQuantizer(input_format, input_amax, tp_group, dp_group, owner=owner, device=device)

    if grouped:
        experts = range(module.num_gemms)
        module.weight_quantizers = (None if weight_format == "bf16" else
                                    torch.nn.ModuleList(weight_quantizer(f"{name}.weight{i}") for i in experts))
        module.input_quantizers = (None if input_format == "bf16" else
                                   torch.nn.ModuleList(input_quantizer(f"{name}.input{i}") for i in experts))
    else:
        module.weight_quantizer = None if weight_format == "bf16" else weight_quantizer(f"{name}.weight")
        module.input_quantizer = None if input_format == "bf16" else input_quantizer(f"{name}.input")


def is_te_linear(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a Transformer Engine linear layer the hooks cover (grouped ones included)."""
    return isinstance(module, hooked_te_linear_types())


def gemm_weights(module: torch.nn.Module) -> list[torch.Tensor | None]:
    """The weight of each GEMM of a linear layer: ``[weight]`` (None for an output layer tied to the
    embedding), or one per local expert of a grouped layer (``weight0``, ``weight1``, ...)."""
    if isinstance(module, te_grouped_linear_types()):
        return [getattr(module, f"weight{expert}") for expert in range(module.num_gemms)]
    return [module.weight]


def weight_quantizers(module: torch.nn.Module) -> list[TensorQuantizer]:
    """The weight quantizers of a quantized linear layer, in the order of :func:`gemm_weights`
    (empty when its weight stays BF16)."""
    if isinstance(module, QuantizedTEGroupedLinear):
        return [] if module.weight_quantizers is None else list(module.weight_quantizers)
    return [] if module.weight_quantizer is None else [module.weight_quantizer]


def is_quantized_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, (QuantizedLinear, QuantizedTELinear, QuantizedTEGroupedLinear))


def is_native_linear(module: torch.nn.Module) -> bool:
    """Whether ``module`` runs its NVFP4 GEMMs natively in Transformer Engine (``backend: te``)."""
    return isinstance(module, NativeNVFP4)


def unquantize_linear(module: torch.nn.Module) -> None:
    """Undo :func:`quantize_linear`: the original class, no quantizers."""
    grouped = isinstance(module, QuantizedTEGroupedLinear)
    if is_native_linear(module):
        del module.native_recipe
    module.__class__ = module.original_class
    for role in ("weight_quantizers", "input_quantizers") if grouped else ("weight_quantizer", "input_quantizer"):
        delattr(module, role)


class QuantizedCoreAttention:
    """Mixin put in front of a core-attention class: FP8 fake quant of K and V, and their static
    amaxes in megatron.core's sharded state dict (core attention's own returns only its softmax
    offset, so dist checkpoints would drop them)."""

    key_quantizer: TensorQuantizer
    value_quantizer: TensorQuantizer

    def forward(self, query, key, value, *args, **kwargs):
        return super().forward(query, self.key_quantizer(key), self.value_quantizer(value), *args, **kwargs)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        amaxes = {f"{name}.amax": getattr(self, name).amax for name in ("key_quantizer", "value_quantizer")
                  if hasattr(getattr(self, name), "amax")}
        # Not in any axis map: replicated over tensor-parallel ranks, which hold the same reduced amax.
        sharded.update(make_sharded_tensors_for_checkpoint(amaxes, prefix, {}, sharded_offsets))
        return sharded


def quantize_kv(core_attention: torch.nn.Module, name: str, amax_mode: str,
                device: torch.device | str | None = None) -> None:
    """Fake-quantize K and V entering ``core_attention`` to FP8 E4M3 (per-tensor amax each);
    ``device``: where the model lives (core attention has no parameter to tell)."""
    tp_group = (parallel_state.get_tensor_model_parallel_group()
                if parallel_state.model_parallel_is_initialized() else None)
    dp_group = data_parallel_group(is_expert=False)  # heads are split over TP ranks
    core_attention.__class__ = _quantized_class(type(core_attention), QuantizedCoreAttention)
    core_attention.key_quantizer = TensorQuantizer("fp8", amax_mode, tp_group, dp_group, owner=f"{name}.key",
                                                   device=device)
    core_attention.value_quantizer = TensorQuantizer("fp8", amax_mode, tp_group, dp_group,
                                                     owner=f"{name}.value", device=device)


def has_kv_quantization(module: torch.nn.Module) -> bool:
    return isinstance(module, QuantizedCoreAttention)


def unquantize_kv(core_attention: torch.nn.Module) -> None:
    """Undo :func:`quantize_kv`."""
    core_attention.__class__ = core_attention.original_class
    del core_attention.key_quantizer
    del core_attention.value_quantizer
