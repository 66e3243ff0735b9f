"""quantization.backend: which implementation runs the NVFP4 GEMMs, and Transformer Engine's recipe.

No Blackwell GPU is at hand, so the native path's selection and recipe are tested here; the
recipe object itself where Transformer Engine is installed (the GPU machine's TE environment).
"""

import pytest
import torch

from distill_helpers import TINY
from megatron_qad.config import ConfigError, load_config
from megatron_qad.quantize.backend import select_backend, te_recipe, te_recipe_settings
from megatron_qad.train.run import check_runnable

BLACKWELL, HOPPER = (10, 0), (9, 0)


@pytest.mark.parametrize("requested, capability, te_version, te_spec, expected", [
    ("auto", BLACKWELL, "2.20.2", True, "te"),
    ("te", BLACKWELL, "2.20.2", True, "te"),
    ("emulated", BLACKWELL, "2.20.2", True, "emulated"),
    ("auto", HOPPER, "2.20.2", True, "emulated"),
    ("auto", BLACKWELL, None, True, "emulated"),
    ("auto", BLACKWELL, "2.20.2", False, "emulated"),
    ("auto", None, None, False, "emulated"),
    ("emulated", None, None, False, "emulated"),
])
def test_backend_selection(requested, capability, te_version, te_spec, expected):
    assert select_backend(requested, capability, te_version, te_spec) == expected


@pytest.mark.parametrize("capability, te_version, te_spec, message", [
    (HOPPER, "2.20.2", True, "compute capability >= 10.0 \\(Blackwell\\); this is a GPU of compute capability 9.0"),
    (None, "2.20.2", True, "this is the CPU"),
    (BLACKWELL, None, True, "Transformer Engine is not installed \\(pip install 'megatron-qad\\[te\\]'\\)"),
    (BLACKWELL, "2.20.2", False, "local spec, which has no Transformer Engine layers"),
])
def test_te_backend_refused_where_it_cannot_run(capability, te_version, te_spec, message):
    with pytest.raises(ConfigError, match=f"'quantization.backend: te' cannot run here: .*{message}.*Use 'auto'"):
        select_backend("te", capability, te_version, te_spec)


def test_unknown_backend_is_refused():
    with pytest.raises(ConfigError, match="'quantization.backend' must be one of"):
        select_backend("fp4", BLACKWELL, "2.20.2", True)


def test_a_run_asking_for_te_on_this_machine_stops_before_building_anything():
    config = load_config(TINY, ["quantization.backend=te"])
    with pytest.raises(ConfigError, match="'quantization.backend: te' cannot run here"):
        check_runnable(config, torch.device("cpu"))
    check_runnable(load_config(TINY, ["quantization.backend=auto"]), torch.device("cpu"))


@pytest.mark.parametrize("weight_format, four_over_six", [("nvfp4", "none"), ("nvfp4_4over6", "all")])
def test_te_recipe_settings_are_deployment_faithful(weight_format, four_over_six):
    """1 x 16 blocks for every tensor, no Hadamard transform, no stochastic rounding, Four Over Six
    as ours (scale bound 256, squared error), high-precision backward GEMMs."""
    assert te_recipe_settings(weight_format) == {
        "disable_rht": True, "disable_stochastic_rounding": True, "disable_2d_quantization": True,
        "nvfp4_4over6": four_over_six, "nvfp4_4over6_e4m3_use_256": "all", "nvfp4_4over6_err_mode": "MSE",
        "backward_override": "high_precision"}
    with pytest.raises(ValueError, match="weight_format must be"):
        te_recipe_settings("fp8")


@pytest.mark.parametrize("weight_format", ["nvfp4", "nvfp4_4over6"])
def test_te_recipe_quantizes_the_forward_as_deployed(weight_format):
    """Transformer Engine's own view of the recipe: what its quantizers will do per GEMM operand."""
    pytest.importorskip("transformer_engine.common.recipe", reason="needs Transformer Engine")
    recipe = te_recipe(weight_format)
    for params in (recipe.fp4_quant_fwd_inp, recipe.fp4_quant_fwd_weight, recipe.fp4_quant_bwd_grad):
        assert not params.random_hadamard_transform
        assert not params.stochastic_rounding
        assert not params.fp4_2d_quantization
    assert recipe.backward_override == "high_precision"
    assert recipe.nvfp4_4over6 == ("all" if weight_format == "nvfp4_4over6" else "none")
