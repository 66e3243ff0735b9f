"""The deployable NVFP4 checkpoint of a quantized student, in the convention ``export.format``
names (see :mod:`.formats`: ``modelopt``, the ModelOpt / TensorRT-LLM layout, and
``compressed_tensors``, compressed-tensors' nvfp4-pack-quantized layout).

Every linear module whose weight is NVFP4 becomes, per HF module (see :mod:`.hf_names`), its
E2M1 codes, E4M3 block scales and fp32 tensor and input scales (:class:`.formats.NVFP4Linear`),
which decode exactly to the student's fake-quantized weight; attention modules get the FP8 KV
cache's ``k_scale`` / ``v_scale`` (amax / 448). Linear layers the policy keeps in BF16, and the
output layer, are written in the export dtype and listed as such (ModelOpt's ``exclude_modules``,
compressed-tensors' ``ignore``); the embedding, norms, router, the shared experts' gate
(Qwen2-MoE's ``shared_expert_gate``) and the Mamba mixers' ``conv1d`` and ``dt_bias`` are written
in the export dtype too. A model that shares its embedding with the output layer
(``model.share_embeddings_and_output_weights``) writes no ``lm_head``: its config.json says
``tie_word_embeddings: true``, and Hugging Face ties ``lm_head`` to ``embed_tokens``.
Written in float32, as HF Nemotron-H holds them: the Mamba mixers' ``A_log`` and ``D`` [heads]
(BF16 values in a BF16 student, as in Megatron-LM's BF16 models) and the router's expert bias
(``e_score_correction_bias`` [experts], a float32 buffer; zeros for a router without one). Files:
``model.safetensors`` (or, above the shard size, ``model-0000i-of-0000n.safetensors`` and
``model.safetensors.index.json``, the Hugging Face layout), ``config.json`` (with
``quantization_config``), the format's side files (ModelOpt: ``hf_quant_config.json``) and the
tokenizer, chat template and ``generation_config.json`` of a serving source (:mod:`.serving`),
written to ``DIR.tmp`` and renamed.
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
from .formats import ExportFormat, NVFP4Linear, Quantization, get_format
from .hf_names import constant_tensors, hf_config, module_map, other_linears, plain_name, take_rows
from .serving import write_serving_files

FLOAT32_TENSORS = (".mixer.A_log", ".mixer.D", ".gate.e_score_correction_bias")
"""Endings of the HF names of tensors written in float32 whatever the export dtype."""


def _encode_scale(amax: torch.Tensor, target_max: float) -> torch.Tensor:
    """fp32 0-d ``S_enc`` exactly as the fake quantization computes it."""
    return encode_scale(amax.float(), target_max).reshape(())


def _nvfp4_whole(module: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The codes, block scales and tensor encode scales of one quantized linear (unsplit)."""
    quantizer = module.weight_quantizer
    four_over_six = quantizer.fmt == "nvfp4_4over6"
    weight = module.weight.detach()
    amax = quantizer.current_amax(weight)
    packed = nvfp4.quantize(weight, amax, four_over_six=four_over_six)
    scale_max = FOUR_OVER_SIX_E4M3_MAX if four_over_six else E4M3_MAX
    whole = {"codes": packed.data, "block_scales": packed.scale,
             "weight_encode_scale": _encode_scale(amax, E2M1_MAX * scale_max)}
    inputs = module.input_quantizer
    if inputs is not None:
        if inputs.amax_mode != "static":
            raise ConfigError(f"{name}: its input scale is dynamic; inference engines need a static one. "
                              f"Train / calibrate with 'quantization.input_amax: static'")
        whole["input_encode_scale"] = _encode_scale(inputs.amax, E2M1_MAX * E4M3_MAX)
    return whole


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


def _linear_pieces(module: torch.nn.Module, module_name: str, pieces: list, groups: int, dtype: torch.dtype,
                   fmt: ExportFormat) -> dict[str, torch.Tensor]:
    """The HF tensors of the pieces of one Megatron linear module (NVFP4 in ``fmt``'s names, or
    its weight and bias in ``dtype``)."""
    quantized = getattr(module, "weight_quantizer", None) is not None
    whole = _nvfp4_whole(module, module_name) if quantized else {"weight": module.weight.detach().to(dtype)}
    if getattr(module, "bias", None) is not None:
        whole["bias"] = module.bias.detach().to(dtype)
    tensors = {}
    for piece in pieces:
        part = {key: tensor.clone() if tensor.dim() == 0 else take_rows(tensor, piece, groups)
                for key, tensor in whole.items()}
        # Piece.output_scale is a power of two: dividing the encode scale, or multiplying the BF16
        # weight, and the bias, by it is exact.
        if piece.output_scale != 1.0:
            for key in ("weight", "bias"):
                if key in part:
                    part[key] = part[key] * piece.output_scale
            if quantized:
                part["weight_encode_scale"] = part["weight_encode_scale"] / piece.output_scale
        if quantized:
            part = fmt.linear_tensors(NVFP4Linear(part["codes"], part["block_scales"], part["weight_encode_scale"],
                                                  part.get("input_encode_scale"), part.get("bias")))
        tensors.update({f"{piece.name}.{suffix}": tensor for suffix, tensor in part.items()})
    return tensors


def export_tensors(model: torch.nn.Module, model_cfg: ModelConfig, dtype: torch.dtype,
                   export_format: str = "modelopt") -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF tensors of a quantized single-process (TP=PP=EP=1) student (GPT or hybrid) in the
    convention ``export_format``, and the HF names of the linear modules left unquantized."""
    fmt = get_format(export_format)
    modules = dict(model.named_modules())
    tensors, excluded = _plain_tensors(model, model_cfg, dtype), []
    for module_name, pieces in module_map(model_cfg).items():
        module = modules[module_name]
        if module_name.endswith("core_attention"):
            if layers.has_kv_quantization(module):
                k_scale, v_scale = (1.0 / _encode_scale(q.amax, E4M3_MAX)
                                    for q in (module.key_quantizer, module.value_quantizer))
                tensors.update({f"{pieces[0].name}.{suffix}": tensor
                                for suffix, tensor in fmt.kv_scales(k_scale, v_scale).items()})
            continue
        if getattr(module, "weight_quantizer", None) is None:
            excluded.extend(piece.name for piece in pieces)
        if module.weight is None:  # the output layer of a model sharing its embedding: HF ties lm_head
            continue
        tensors.update(_linear_pieces(module, module_name, pieces, model_cfg.num_query_groups, dtype, fmt))
    tensors.update(constant_tensors(model_cfg, dtype))
    return tensors, excluded


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
                     dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 5 * 2**30,
                     export_format: str = "modelopt", serving_source: Path | None = None) -> Path:
    """Write the export of ``model`` (the quantized student: a bare GPTModel or HybridModel at
    TP=PP=EP=1) in the convention ``export_format`` (``modelopt`` or ``compressed_tensors``) to
    ``out_dir`` (replaced if it exists), in safetensors files of at most ``max_shard_bytes`` bytes,
    with the tokenizer, chat template and generation config of ``serving_source`` (a directory; see
    :mod:`.serving`); return its path. Raises ConfigError, before writing anything, for a model the
    target Hugging Face architecture cannot hold."""
    out_dir = Path(out_dir)
    fmt = get_format(export_format)
    config = hf_config(model_cfg, model.config)
    tensors, excluded = export_tensors(model, model_cfg, dtype, export_format)
    quantization = Quantization(bf16_linears=excluded, other_linears=other_linears(model_cfg),
                                kv_fp8=any(name.endswith(".k_scale") for name in tensors))
    config.update(torch_dtype=str(dtype).removeprefix("torch."),
                  quantization_config=fmt.quantization_config(quantization))
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_tensors(tensors, tmp, max_shard_bytes)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    producer = {"name": "megatron_qad", "version": __version__}
    for filename, content in fmt.side_files(quantization, producer).items():
        (tmp / filename).write_text(json.dumps(content, indent=2) + "\n")
    if serving_source is not None:
        write_serving_files(serving_source, tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir
