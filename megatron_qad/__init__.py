"""megatron_qad: Quantization-Aware Distillation of Megatron-LM models to NVFP4."""

__version__ = "0.1.0"
