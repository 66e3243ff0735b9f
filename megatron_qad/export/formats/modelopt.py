"""The ModelOpt / TensorRT-LLM convention (``export.format: modelopt``), which TensorRT-LLM and
vLLM (``quant_method: modelopt``) load. Per NVFP4 linear module:

  ``<module>.weight``          uint8 [N, K/2]: E2M1 codes, two per byte (element 2i in the low nibble)
  ``<module>.weight_scale``    float8_e4m3fn [N, K/16]: one decode scale per block of 16
  ``<module>.weight_scale_2``  float32 []: the tensor decode scale ``1 / S_enc``
  ``<module>.input_scale``     float32 []: the activation's tensor decode scale, input amax / (6 x 448)

so that ``weight = e2m1(code) x weight_scale x weight_scale_2`` (evaluated in that order in fp32)
is exactly the student's fake-quantized weight; attention modules get ``k_scale`` / ``v_scale``
(float32 [], amax / 448: the FP8 KV cache's decode scales). The quantization is described twice:
``config.json``'s ``quantization_config`` (``quant_method: modelopt``) and ``hf_quant_config.json``
(``producer`` and ``quantization``), each with ``quant_algo: NVFP4``, ``group_size: 16``,
``exclude_modules`` (the linears kept in the export dtype) and, with an FP8 KV cache,
``kv_cache_quant_algo: FP8``."""

import torch

from .base import ExportFormat, NVFP4Linear, Quantization

QUANT_ALGO, KV_CACHE_ALGO, GROUP_SIZE = "NVFP4", "FP8", 16


def _decode(encode_scale: torch.Tensor) -> torch.Tensor:
    return (1.0 / encode_scale).reshape(())


def linear_tensors(linear: NVFP4Linear) -> dict[str, torch.Tensor]:
    tensors = {"weight": linear.codes, "weight_scale": linear.block_scales,
               "weight_scale_2": _decode(linear.weight_encode_scale)}
    if linear.input_encode_scale is not None:
        tensors["input_scale"] = _decode(linear.input_encode_scale)
    if linear.bias is not None:
        tensors["bias"] = linear.bias
    return tensors


def kv_scales(k_scale: torch.Tensor, v_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"k_scale": k_scale.reshape(()), "v_scale": v_scale.reshape(())}


def _quantization(quantization: Quantization) -> dict:
    config = {"quant_algo": QUANT_ALGO, "group_size": GROUP_SIZE,
              "exclude_modules": sorted(quantization.bf16_linears)}
    if quantization.kv_fp8:
        config["kv_cache_quant_algo"] = KV_CACHE_ALGO
    return config


def quantization_config(quantization: Quantization) -> dict:
    return {"quant_method": "modelopt", **_quantization(quantization)}


def side_files(quantization: Quantization, producer: dict) -> dict[str, dict]:
    return {"hf_quant_config.json": {"producer": producer, "quantization": _quantization(quantization)}}


FORMAT = ExportFormat(linear_tensors, kv_scales, quantization_config, side_files)
