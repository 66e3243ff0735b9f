"""Which implementation runs the student's NVFP4 GEMMs (``quantization.backend``).

  ``emulated``  fake quant (exact NVFP4 values, :mod:`megatron_qad.numerics`) in front of a BF16 GEMM:
                any GPU or CPU, the same bits everywhere.
  ``te``        Transformer Engine's native NVFP4 GEMMs (FP4 tensor cores), compute capability >= 10.0
                (Blackwell), in the Transformer Engine layers of a TE-spec model, under the recipe
                :func:`te_recipe_settings` describes.
  ``auto``      ``te`` where it can run, else ``emulated``.

The native path needs a TE-spec student (``model.transformer_impl: transformer_engine``) on a
Blackwell GPU with Transformer Engine; elsewhere ``auto`` resolves to ``emulated`` and ``te`` is
refused with the reason (see :func:`select_backend`). Where it runs, ``quantize.apply(...,
backend="te")`` gives each quantized TE layer Transformer Engine's own forward inside TE's
``autocast`` with :func:`te_recipe` (``te_layers.NativeNVFP4``). Differences from the emulated path:
TE scales each activation with its own per-tensor amax at every call (its recipe has no static
activation scale; the calibrated input amaxes still go to the export), and TE's GEMMs accumulate in
their own order. No Blackwell GPU was available to run it: the selection, the recipe and the
mechanism (with TE's FP8 recipe in the NVFP4 recipe's place, on Hopper) are tested.
"""

from ..config import ConfigError

BACKENDS = ("auto", "emulated", "te")
NATIVE_NVFP4_CAPABILITY = (10, 0)
"""The first compute capability with FP4 tensor cores (Blackwell)."""


def select_backend(requested: str, capability: tuple[int, int] | None, te_version: str | None,
                   te_spec_model: bool) -> str:
    """The backend ("emulated" or "te") that runs, for ``quantization.backend = requested``.

    capability: the GPU's (major, minor) compute capability, None on the CPU; te_version: the
    installed Transformer Engine's version, None without it; te_spec_model: whether the student is
    built from Transformer Engine layers. ``te`` raises ConfigError naming what is missing.
    """
    if requested not in BACKENDS:
        raise ConfigError(f"'quantization.backend' must be one of {BACKENDS}, got {requested!r}")
    missing = []
    if capability is None or capability < NATIVE_NVFP4_CAPABILITY:
        where = "the CPU" if capability is None else f"a GPU of compute capability {capability[0]}.{capability[1]}"
        missing.append(f"native NVFP4 GEMMs need compute capability >= 10.0 (Blackwell); this is {where}")
    if te_version is None:
        missing.append("Transformer Engine is not installed (pip install 'megatron-qad[te]')")
    if not te_spec_model:
        missing.append("the student is built from megatron.core's local spec, which has no Transformer "
                       "Engine layers to run them in")
    if requested == "te" and missing:
        raise ConfigError("'quantization.backend: te' cannot run here: " + "; ".join(missing)
                          + ". Use 'auto' or 'emulated' (the same NVFP4 values, emulated)")
    if requested == "emulated" or missing:
        return "emulated"
    return "te"


def te_recipe_settings(weight_format: str) -> dict:
    """Keyword arguments of Transformer Engine's ``NVFP4BlockScaling`` recipe that quantize the
    student's forward GEMMs as an inference engine will (``weight_format``: "nvfp4" or
    "nvfp4_4over6"):

    * 1 x 16 blocks for weights too (no 16 x 16 2D weight blocks), no random Hadamard transform, no
      stochastic rounding: the deployed checkpoint's layout and round-to-nearest-even;
    * Four Over Six on weights and activations alike, tensor scale bound 256, choice by squared
      error (docs/NUMERICS.md), when ``weight_format`` is "nvfp4_4over6";
    * the backward GEMMs (dgrad, wgrad) on the high-precision operands, as the emulated path's
      straight-through gradient does.
    """
    if weight_format not in ("nvfp4", "nvfp4_4over6"):
        raise ValueError(f"weight_format must be 'nvfp4' or 'nvfp4_4over6', got {weight_format!r}")
    four_over_six = weight_format == "nvfp4_4over6"
    return {"disable_rht": True, "disable_stochastic_rounding": True, "disable_2d_quantization": True,
            "nvfp4_4over6": "all" if four_over_six else "none", "nvfp4_4over6_e4m3_use_256": "all",
            "nvfp4_4over6_err_mode": "MSE", "backward_override": "high_precision"}


def te_recipe(weight_format: str):
    """Transformer Engine's ``NVFP4BlockScaling`` recipe with :func:`te_recipe_settings`."""
    try:
        from transformer_engine.common.recipe import NVFP4BlockScaling
    except ImportError as error:
        raise ConfigError("'quantization.backend: te' needs Transformer Engine: pip install 'megatron-qad[te]'") from error
    return NVFP4BlockScaling(**te_recipe_settings(weight_format))
