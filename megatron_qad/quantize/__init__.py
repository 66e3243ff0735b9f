"""Hooks that turn a megatron.core model into an NVFP4 student (and back), with their policies.

    from megatron_qad import quantize
    report = quantize.apply(model, "transformer")   # or "hybrid", or a quantize.Policy
    quantize.calibrate(model, batches)              # or: with quantize.calibration(model): <forwards>
    print(report.format_table())
"""

from . import backend
from .apply import apply, calibrate, calibration, plan, remove, report, reuse_quantized_weights
from .policy import Policy, PolicyError, Rule, hybrid, policy_from_dict, transformer
from .quantizer import TensorQuantizer
from .report import QuantReport

__all__ = ["backend", "apply", "calibrate", "calibration", "plan", "remove", "report", "reuse_quantized_weights", "Policy",
           "PolicyError", "Rule", "hybrid", "policy_from_dict", "transformer", "TensorQuantizer", "QuantReport"]
