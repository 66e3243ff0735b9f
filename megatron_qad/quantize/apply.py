"""Turn a megatron.core model into an NVFP4 student in place, undo it, and calibrate its scales.

    report = quantize.apply(model, "hybrid")       # or a Policy; returns a QuantReport
    quantize.calibrate(model, batches)             # static input / KV amax (max over batches)
    quantize.remove(model)                         # back to the BF16 model
"""

import contextlib
import fnmatch
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from ..numerics.formats import BLOCK_SIZE
from ..models import all_layer_types
from . import grouped_mlp, layers
from .backend import te_recipe
from .kinds import LinearModule, core_attention_modules, find_unsupported, linear_modules
from .policy import BUILTIN_POLICIES, QUANTIZABLE_KINDS, Policy, PolicyError
from .quantizer import TensorQuantizer
from .report import QuantReport, build_report

NVFP4_BACKENDS = ("emulated", "te")
"""How :func:`apply` runs the quantized GEMMs (``backend.select_backend`` resolves "auto" to one)."""


def _as_policy(policy: Policy | str) -> Policy:
    if isinstance(policy, Policy):
        return policy
    if policy not in BUILTIN_POLICIES:
        raise PolicyError(f"unknown policy {policy!r}; built-ins are {sorted(BUILTIN_POLICIES)}")
    return BUILTIN_POLICIES[policy]()


def _rule_matches(rule, linear: LinearModule) -> bool:
    return ((not rule.kinds or linear.kind in rule.kinds)
            and (not rule.modules or any(fnmatch.fnmatchcase(linear.name, glob) for glob in rule.modules))
            and (not rule.feeds_attention or linear.feeds_attention))


def _chunks(model: torch.nn.Module | Sequence[torch.nn.Module]) -> list[torch.nn.Module]:
    chunks = [model] if isinstance(model, torch.nn.Module) else list(model)
    if not chunks or not all(isinstance(chunk, torch.nn.Module) for chunk in chunks):
        raise TypeError(f"expected a model or a non-empty list of model chunks, got {type(model).__name__}")
    return chunks


def plan(model: torch.nn.Module | Sequence[torch.nn.Module], policy: Policy,
         backend: str = "emulated") -> list[tuple[LinearModule, str, str]]:
    """(linear module, weight format, input format) for every linear layer of ``model`` (a model
    or this rank's list of virtual-pipeline chunks); validates everything that can be checked
    before a weight is touched, for the NVFP4 ``backend`` ("emulated" or "te")."""
    if backend not in NVFP4_BACKENDS:
        raise PolicyError(f"backend must be one of {NVFP4_BACKENDS}, got {backend!r}")
    chunks = _chunks(model)
    unsupported = [name for chunk in chunks for name in find_unsupported(chunk)]
    if unsupported:
        raise PolicyError(
            "these Transformer Engine layers have no NVFP4 hooks: " + ", ".join(unsupported[:4])
            + (" ..." if len(unsupported) > 4 else "") + ". Build the student from megatron.core's TE "
            "or local spec, whose linear, fused-norm linear and grouped-GEMM expert layers are hooked")
    whole_model_types = all_layer_types(chunks)
    linears = [linear for chunk in chunks for linear in linear_modules(chunk, whole_model_types)]
    for index, rule in enumerate(policy.rules):
        for glob in rule.modules:
            if not any(fnmatch.fnmatchcase(linear.name, glob) for linear in linears):
                examples = ", ".join(linear.name for linear in linears[:3])
                raise PolicyError(f"quantization rule {index}: modules pattern {glob!r} matches no linear "
                                  f"layer of the model; names look like {examples}")
    formats = []
    for linear in linears:
        weight_format = input_format = "bf16"
        if linear.kind in QUANTIZABLE_KINDS:
            for rule in policy.rules:
                if _rule_matches(rule, linear):
                    weight_format, input_format = rule.weight, rule.input_format
        formats.append((linear, weight_format, input_format))
    for linear, weight_format, input_format in formats:
        if weight_format == input_format == "bf16":
            continue
        layers.check_quantizable(linear.module, linear.name)
        if backend == "te":
            _check_native(linear, weight_format, input_format)
        weight = layers.gemm_weights(linear.module)[0]
        k = weight.shape[-1]
        if k % BLOCK_SIZE:
            raise PolicyError(f"{linear.name}: its weight {tuple(weight.shape)} has K = {k} "
                              f"(per tensor-parallel rank), not a multiple of {BLOCK_SIZE}, so NVFP4 blocks "
                              f"do not fit; keep it in BF16 with a rule {{modules: [{linear.name!r}], "
                              f"weight: bf16}} or change the model's sizes")
        if getattr(linear.module, "gradient_accumulation_fusion", False):
            raise PolicyError(f"{linear.name}: gradient_accumulation_fusion writes weight gradients into "
                              f"weight.main_grad past the straight-through estimator of the NVFP4 weight; "
                              f"build the student with gradient_accumulation_fusion=False")
    return formats


def _check_native(linear: LinearModule, weight_format: str, input_format: str) -> None:
    """Raise PolicyError where the native backend cannot run a layer as the policy says."""
    if not layers.is_te_linear(linear.module):
        raise PolicyError(f"{linear.name}: 'quantization.backend: te' runs NVFP4 GEMMs in Transformer Engine "
                          f"layers, and this is megatron.core's local {type(linear.module).__name__}; build the "
                          f"student with model.transformer_impl=transformer_engine, or use backend emulated")
    if weight_format != input_format:
        raise PolicyError(f"{linear.name}: 'quantization.backend: te' quantizes a GEMM's weight and input alike, "
                          f"and the policy gives it a {weight_format} weight and a {input_format} input; make "
                          f"the rule's input {weight_format!r} or use backend emulated")


def apply(model: torch.nn.Module | Sequence[torch.nn.Module], policy: Policy | str = "transformer",
          backend: str = "emulated") -> QuantReport:
    """Quantize ``model`` in place as ``policy`` says (a Policy or a built-in's name).

    ``model``: a model, or this rank's list of virtual-pipeline chunks (one report for all).
    Linear layers get NVFP4 fake quant of weight and input (or stay BF16); a ``SequentialMLP`` whose
    experts' linear layers are all quantized runs their quantizers grouped (:mod:`.grouped_mlp`);
    with ``kv_cache: fp8`` core attention gets FP8 fake quant of K and V. Every check runs before
    any module changes.
    Static input / KV amaxes start uncalibrated: run :func:`calibrate` or load a checkpoint.
    ``backend``: "emulated", or "te" for Transformer Engine's native NVFP4 GEMMs in the quantized
    TE layers (``backend.select_backend`` says where they can run).
    """
    policy = _as_policy(policy)
    chunks = _chunks(model)
    whole = torch.nn.ModuleList(chunks)  # a view over the chunks' own modules, for the report
    if any(layers.is_quantized_linear(m) or layers.has_kv_quantization(m) for m in whole.modules()):
        raise PolicyError("the model is already quantized; call megatron_qad.quantize.remove(model) first")
    formats = plan(chunks, policy, backend)
    recipes = {}  # weight format -> Transformer Engine recipe, for the native backend
    for linear, weight_format, input_format in formats:
        if weight_format == input_format == "bf16":
            continue
        if backend == "te" and weight_format not in recipes:
            recipes[weight_format] = te_recipe(weight_format)
        layers.quantize_linear(linear.module, linear.name, weight_format, input_format, policy.input_amax,
                               native_recipe=recipes.get(weight_format))
    for module in whole.modules():
        if grouped_mlp.groups_experts(module):
            grouped_mlp.quantize_sequential_mlp(module)  # its experts' quantizers then run grouped
    if policy.kv_cache == "fp8":
        for chunk in chunks:
            device = next(chunk.parameters()).device
            for name, core_attention in core_attention_modules(chunk):
                layers.quantize_kv(core_attention, name, policy.input_amax, device)
    return build_report(whole, formats, policy)


def report(model: torch.nn.Module | Sequence[torch.nn.Module], policy: Policy | str = "transformer") -> QuantReport:
    """The :class:`QuantReport` of a model already quantized with ``policy``, from its current
    weights (e.g. after loading a trained student). Every rank must call it (TP amax reductions)."""
    policy = _as_policy(policy)
    chunks = _chunks(model)
    return build_report(torch.nn.ModuleList(chunks), plan(chunks, policy), policy)


def remove(model: torch.nn.Module | Sequence[torch.nn.Module]) -> None:
    """Undo :func:`apply` (on a model or a list of chunks): original classes, no quantizers, no hooks."""
    for module in torch.nn.ModuleList(_chunks(model)).modules():
        if grouped_mlp.is_quantized_sequential_mlp(module):
            grouped_mlp.unquantize_sequential_mlp(module)
        if layers.is_quantized_linear(module):
            layers.unquantize_linear(module)
        if layers.has_kv_quantization(module):
            layers.unquantize_kv(module)


def _default_forward(model: torch.nn.Module, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


@contextlib.contextmanager
def calibration(model: torch.nn.Module | Sequence[torch.nn.Module]) -> Iterator[None]:
    """Max calibration of every static amax of ``model`` (a model or a list of chunks) over the
    forward passes run inside the block, by any code (e.g. a forward-only pipeline schedule).

    Inside the block quantizers pass their inputs through unquantized (the activations are the
    BF16 model's) and static ones record max |x|. On leaving it normally each static amax is
    MAX-reduced over its layer's tensor- and data-parallel groups, so every rank of the job must
    run the block. Raises ValueError if no quantizer saw an input (no forward pass ran).
    """
    quantizers = [m for m in torch.nn.ModuleList(_chunks(model)).modules() if isinstance(m, TensorQuantizer)]
    for quantizer in quantizers:
        quantizer.start_calibration()
    try:
        yield
    finally:
        for quantizer in quantizers:
            quantizer.calibrating = False
    static = [quantizer for quantizer in quantizers if quantizer.amax_mode == "static"]
    if static and all(torch.isnan(quantizer.amax) for quantizer in static):
        raise ValueError("calibration saw no forward pass: run the model on at least one batch "
                         "inside the 'with quantize.calibration(model):' block")
    for quantizer in static:
        quantizer.finish_calibration()


@contextlib.contextmanager
def reuse_quantized_weights(model: torch.nn.Module | Sequence[torch.nn.Module]) -> Iterator[None]:
    """Fake-quantize each weight of ``model`` (a model or a list of chunks) once inside the block
    and reuse the result in every later forward pass of the block; gradients still reach the
    weights (straight through), and the numerics are those of quantizing at every call.

    For the micro-batches of one optimizer step, whose weights do not change: it saves one amax,
    one quantization (and under tensor parallelism one all-reduce) per weight and micro-batch, and
    costs one quantized copy of the weights (the parameters' dtype) until the block ends. The
    weights must not be modified inside the block (the optimizer steps outside it).
    """
    quantizers = [quantizer for module in torch.nn.ModuleList(_chunks(model)).modules()
                  if layers.is_quantized_linear(module) for quantizer in layers.weight_quantizers(module)]
    for quantizer in quantizers:
        quantizer.start_holding()
    try:
        yield
    finally:
        for quantizer in quantizers:
            quantizer.stop_holding()


def calibrate(model: torch.nn.Module, batches: Iterable,
              forward: Callable[[torch.nn.Module, object], object] = _default_forward) -> int:
    """Set every static amax to the max |x| seen over ``batches`` (max calibration); return the count.

    The forward passes run in eval mode without gradients (see :func:`calibration`, which this
    wraps; under pipeline parallelism use that around a forward-only schedule instead).
    ``forward(model, batch)`` runs one batch (default: ``model(**batch)``, ``model(*batch)`` or
    ``model(batch)``). Returns 0 without running anything when the model has no quantizer.
    """
    if not any(isinstance(m, TensorQuantizer) for m in model.modules()):
        return 0
    was_training = model.training
    model.eval()
    count = 0
    try:
        with calibration(model), torch.no_grad():
            for batch in batches:
                forward(model, batch)
                count += 1
            if count == 0:
                raise ValueError("calibrate() got no batches; pass at least one")
    finally:
        model.train(was_training)
    return count
