"""Test-session settings that must hold before any CUDA work starts.

``NVIDIA_TF32_OVERRIDE=0``: with Transformer Engine installed, megatron.core computes the MoE
router's logits with TE's cuBLAS GEMM, which uses TF32 for fp32 operands unless this is set; the
GPU tests compare fp32 models with fp32 references, so every GEMM stays in true fp32.
"""

import os

os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")
