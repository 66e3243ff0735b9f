"""The deployable NVFP4 checkpoint of a quantized student, in the ModelOpt / TensorRT-LLM convention.

For every linear module whose weight is NVFP4 (HF names, see :mod:`.hf_names`):

  ``<module>.weight``          uint8 [N, K/2]: E2M1 codes, two per byte (element 2i in the low nibble)
  ``<module>.weight_scale``    float8_e4m3fn [N, K/16]: one decode scale per block of 16
  ``<module>.weight_scale_2``  float32 []: the tensor decode scale, ``1 / S_enc`` (amax / (6 x 448),
                               or amax / (6 x 256) for Four Over Six, whose blocks use scales <= 256)
  ``<module>.input_scale``     float32 []: the activation's tensor decode scale, input amax / (6 x 448)

so that ``weight = e2m1(code) x weight_scale x weight_scale_2`` is exactly the student's fake-quantized
weight. Attention modules get ``k_scale`` / ``v_scale`` (float32 [], amax / 448: the FP8 KV cache).
Linear layers the policy keeps in BF16, and the output layer, are written in the export dtype and
listed in ``exclude_modules``; the embedding, norms, router, the shared experts' gate (Qwen2-MoE's
``shared_expert_gate``) and the Mamba mixers' ``conv1d`` and ``dt_bias`` are written in the export
dtype too (unlisted: they are not quantizable linears).
Written in float32, as HF Nemotron-H holds them: the Mamba mixers' ``A_log`` and ``D`` [heads]
(BF16 values in a BF16 student, as in Megatron-LM's BF16 models) and the router's expert bias
(``e_score_correction_bias`` [experts], a float32 buffer). Files: ``model.safetensors`` (or, above the shard
size, ``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``, the Hugging Face
layout), ``config.json`` (with ``quantization_config``) and ``hf_quant_config.json``, written to
``DIR.tmp`` and renamed.
"""

import itertools
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import __version__
from ..config import ConfigError, ModelConfig
from ..numerics import nvfp4
from ..numerics.formats import E2M1_MAX, E4M3_MAX, FOUR_OVER_SIX_E4M3_MAX, encode_scale
from ..quantize import layers
from .hf_names import constant_tensors, hf_config, module_map, plain_name, take_rows

QUANT_ALGO, KV_CACHE_ALGO, GROUP_SIZE = "NVFP4", "FP8", 16
FLOAT32_TENSORS = (".mixer.A_log", ".mixer.D", ".gate.e_score_correction_bias")
"""Endings of the HF names of tensors written in float32 whatever the export dtype."""


def _decode_scale(amax: torch.Tensor, target_max: float) -> torch.Tensor:
    """fp32 0-d ``1 / S_enc`` exactly as the fake quantization multiplies by it."""
    return (1.0 / encode_scale(amax.float(), target_max)).reshape(())


def _nvfp4_tensors(module: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The packed weight, block scales and tensor scales of one quantized linear (unsplit)."""
    quantizer = module.weight_quantizer
    four_over_six = quantizer.fmt == "nvfp4_4over6"
    weight = module.weight.detach()
    amax = quantizer.current_amax(weight)
    packed = nvfp4.quantize(weight, amax, four_over_six=four_over_six)
    scale_max = FOUR_OVER_SIX_E4M3_MAX if four_over_six else E4M3_MAX
    tensors = {"weight": packed.data, "weight_scale": packed.scale,
               "weight_scale_2": _decode_scale(amax, E2M1_MAX * scale_max)}
    inputs = module.input_quantizer
    if inputs is not None:
        if inputs.amax_mode != "static":
            raise ConfigError(f"{name}: its input scale is dynamic; inference engines need a static one. "
                              f"Train / calibrate with 'quantization.input_amax: static'")
        tensors["input_scale"] = _decode_scale(inputs.amax, E2M1_MAX * E4M3_MAX)
    return tensors


def _plain_tensors(model: torch.nn.Module, model_cfg: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The HF tensors of the parameters and buffers outside linear modules (embedding, norms, router
    and its expert bias, Mamba convolution and SSM parameters), in ``dtype`` or float32
    (``FLOAT32_TENSORS``), shaped as in the student."""
    tensors = {}
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        hf_name = plain_name(name, model_cfg)
        if hf_name is not None:
            tensors[hf_name] = tensor.detach().to(torch.float32 if hf_name.endswith(FLOAT32_TENSORS) else dtype)
    return tensors


def export_tensors(model: torch.nn.Module, model_cfg: ModelConfig,
                   dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF tensors of a quantized single-process (TP=PP=EP=1) student (GPT or hybrid), and the HF
    names of the linear modules left unquantized."""
    modules = dict(model.named_modules())
    tensors, excluded = _plain_tensors(model, model_cfg, dtype), []
    groups = model_cfg.num_query_groups
    for module_name, pieces in module_map(model_cfg).items():
        module = modules[module_name]
        if module_name.endswith("core_attention"):
            if layers.has_kv_quantization(module):
                for tensor_name, quantizer in (("k_scale", module.key_quantizer), ("v_scale", module.value_quantizer)):
                    tensors[f"{pieces[0].name}.{tensor_name}"] = _decode_scale(quantizer.amax, E4M3_MAX)
            continue
        quantized = getattr(module, "weight_quantizer", None) is not None
        whole = (_nvfp4_tensors(module, module_name) if quantized
                 else {"weight": module.weight.detach().to(dtype)})
        # What a Piece.output_scale (a power of two, so exactly) multiplies: the NVFP4 tensor
        # scale or the BF16 weight, and the bias.
        output_scaled = ("weight_scale_2", "bias") if quantized else ("weight", "bias")
        if getattr(module, "bias", None) is not None:
            whole["bias"] = module.bias.detach().to(dtype)
        for piece in pieces:
            if not quantized:
                excluded.append(piece.name)
            for suffix, tensor in whole.items():
                tensor = tensor.clone() if tensor.dim() == 0 else take_rows(tensor, piece, groups)
                if piece.output_scale != 1.0 and suffix in output_scaled:
                    tensor = tensor * piece.output_scale
                tensors[f"{piece.name}.{suffix}"] = tensor
    tensors.update(constant_tensors(model_cfg, dtype))
    return tensors, excluded


def quantization_config(excluded: list[str], kv_fp8: bool) -> dict:
    """The ModelOpt-convention quantization description (``hf_quant_config.json``'s "quantization")."""
    config = {"quant_algo": QUANT_ALGO, "group_size": GROUP_SIZE, "exclude_modules": sorted(excluded)}
    if kv_fp8:
        config["kv_cache_quant_algo"] = KV_CACHE_ALGO
    return config


def shard(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split ``tensors`` (in order) into groups of at most ``max_shard_bytes`` bytes each (a larger
    tensor gets a group of its own)."""
    shards, size = [{}], 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def _save_tensors(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> None:
    shards = shard({name: tensor.contiguous().cpu() for name, tensor in tensors.items()}, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for index, group in enumerate(shards, start=1):
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(group, str(directory / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, filename))
        total += sum(tensor.numel() * tensor.element_size() for tensor in group.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def write_checkpoint(model: torch.nn.Module, model_cfg: ModelConfig, out_dir: str | Path,
                     dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write the export of ``model`` (the quantized student: a bare GPTModel or HybridModel at
    TP=PP=EP=1) to ``out_dir`` (replaced if it exists), in safetensors files of at most
    ``max_shard_bytes`` bytes; return its path. Raises ConfigError, before writing anything, for a
    model the target Hugging Face architecture cannot hold."""
    out_dir = Path(out_dir)
    config = hf_config(model_cfg, model.config)
    tensors, excluded = export_tensors(model, model_cfg, dtype)
    kv_fp8 = any(name.endswith(".k_scale") for name in tensors)
    quant = quantization_config(excluded, kv_fp8)
    config.update(torch_dtype=str(dtype).removeprefix("torch."),
                  quantization_config={"quant_method": "modelopt", **quant})
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_tensors(tensors, tmp, max_shard_bytes)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "megatron_qad", "version": __version__}, "quantization": quant}, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir
