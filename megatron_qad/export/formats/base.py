"""What every export format receives: one quantized linear's NVFP4 tensors, and the model-wide
facts its ``quantization_config`` describes. A format (one module each, registered in
:mod:`.`) only names and scales these; the writer computes them."""

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class NVFP4Linear:
    """The NVFP4 tensors of one HF linear module (one piece of a Megatron linear, see
    :class:`..hf_names.Piece`), whose weight is ``e2m1(codes) x block_scales / weight_encode_scale``
    exactly (the student's fake-quantized weight, in fp32):

    ``codes``               uint8 [N, K/2]: E2M1 codes, two per byte (element 2i in the low nibble)
    ``block_scales``        float8_e4m3fn [N, K/16]: one decode scale per block of 16
    ``weight_encode_scale`` float32 []: the tensor encode scale ``S_enc`` (6 x 448 / amax, or
                            6 x 256 / amax for Four Over Six), divided by the piece's output scale
    ``input_encode_scale``  float32 [] (6 x 448 / input amax), or None where the input is not quantized
    ``bias``                [N] in the export dtype, or None
    """

    codes: torch.Tensor
    block_scales: torch.Tensor
    weight_encode_scale: torch.Tensor
    input_encode_scale: torch.Tensor | None
    bias: torch.Tensor | None


@dataclass(frozen=True)
class Quantization:
    """What the export quantized, in HF module names: ``bf16_linears`` are the quantizable linear
    modules the policy kept in the export dtype (the output layer always); ``other_linears`` the
    linear maps that are no quantizable linear here (the MoE routers, Qwen2-MoE's
    ``shared_expert_gate``), also in the export dtype; ``kv_fp8``: whether the attention modules
    carry FP8 ``k_scale`` / ``v_scale``."""

    bf16_linears: list[str]
    other_linears: list[str]
    kv_fp8: bool


@dataclass(frozen=True)
class ExportFormat:
    """One on-disk convention. ``linear_tensors(linear)``: {tensor name suffix: tensor} of one
    NVFP4 linear module. ``kv_scales(k_scale, v_scale)``: {suffix: tensor} of an attention module
    whose K and V go through an FP8 cache (float32 [] each: amax / 448, the FP8 decode scales).
    ``quantization_config(quantization)``: the ``quantization_config`` of ``config.json``.
    ``side_files(quantization, producer)``: {file name: JSON object} written beside it
    (``producer``: {"name", "version"} of this package)."""

    linear_tensors: Callable[[NVFP4Linear], dict[str, torch.Tensor]]
    kv_scales: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
    quantization_config: Callable[[Quantization], dict]
    side_files: Callable[[Quantization, dict], dict[str, dict]]
