"""The compressed-tensors convention (``export.format: compressed_tensors``): the
``nvfp4-pack-quantized`` format that vLLM (``quant_method: compressed-tensors``), transformers and
llm-compressor read. Per NVFP4 linear module:

  ``<module>.weight_packed``        uint8 [N, K/2]: E2M1 codes, two per byte (element 2i in the
                                    low nibble, as compressed-tensors' ``pack_fp4_to_uint8``)
  ``<module>.weight_scale``         float8_e4m3fn [N, K/16]: one decode scale per block of 16
  ``<module>.weight_global_scale``  float32 [1]: the tensor *encode* scale ``S_enc`` (6 x 448 / amax),
                                    the reciprocal of ModelOpt's ``weight_scale_2``
  ``<module>.input_global_scale``   float32 [1]: the activation's encode scale, 6 x 448 / input amax

compressed-tensors dequantizes ``e2m1(code) x (weight_scale / weight_global_scale)``; it divides
where the student multiplies by ``1 / S_enc``, so its fp32 weights may differ from the student's
in the last bit (docs/EXPORT.md gives the measured spread). The global scales are the values the
student encoded with, as compressed-tensors' ``generate_gparam`` computes them from the same amax
(Four Over Six: 6 x 256 / amax, which its dequantization reads alike). Attention modules get
``k_scale`` / ``v_scale`` (float32 [1], amax / 448).

``config.json``'s ``quantization_config``: one config group targeting ``Linear`` with NVFP4
weights (static, tensor_group, 16) and NVFP4 input activations (block scales computed at run
time, ``dynamic: local``; the global scale static), ``ignore``: every linear map written in the
export dtype (the BF16 linears and the output layer, the MoE routers, Qwen2-MoE's
``shared_expert_gate``), and ``kv_cache_scheme`` (FP8 E4M3, one static scale per tensor) when
the KV cache is FP8."""

import torch

from .base import ExportFormat, NVFP4Linear, Quantization

FORMAT_NAME = "nvfp4-pack-quantized"
_NVFP4_ARGS = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
               "scale_dtype": "torch.float8_e4m3fn"}
"""compressed-tensors ``QuantizationArgs`` of its NVFP4 preset, as serialized in config.json."""
_FP8_KV_CACHE = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}


def _scalar(tensor: torch.Tensor) -> torch.Tensor:
    """float32 [1]: the shape compressed-tensors registers its global and KV scales with."""
    return tensor.float().reshape(1)


def linear_tensors(linear: NVFP4Linear) -> dict[str, torch.Tensor]:
    tensors = {"weight_packed": linear.codes, "weight_scale": linear.block_scales,
               "weight_global_scale": _scalar(linear.weight_encode_scale)}
    if linear.input_encode_scale is not None:
        tensors["input_global_scale"] = _scalar(linear.input_encode_scale)
    if linear.bias is not None:
        tensors["bias"] = linear.bias
    return tensors


def kv_scales(k_scale: torch.Tensor, v_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"k_scale": _scalar(k_scale), "v_scale": _scalar(v_scale)}


def quantization_config(quantization: Quantization) -> dict:
    group = {"targets": ["Linear"], "weights": {**_NVFP4_ARGS, "dynamic": False},
             "input_activations": {**_NVFP4_ARGS, "dynamic": "local"}, "output_activations": None,
             "format": FORMAT_NAME}
    return {"quant_method": "compressed-tensors", "format": FORMAT_NAME, "quantization_status": "compressed",
            "config_groups": {"group_0": group},
            "ignore": sorted({*quantization.bf16_linears, *quantization.other_linears}),
            "kv_cache_scheme": dict(_FP8_KV_CACHE) if quantization.kv_fp8 else None}


def side_files(quantization: Quantization, producer: dict) -> dict[str, dict]:
    return {}


FORMAT = ExportFormat(linear_tensors, kv_scales, quantization_config, side_files)
