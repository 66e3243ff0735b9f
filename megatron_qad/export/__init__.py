"""Deployable checkpoints: ``export(config)`` writes the run's newest student as an NVFP4 Hugging
Face checkpoint, GPT models in Llama / Qwen2 / Qwen2-MoE names and hybrid (Mamba) models in
Nemotron-H names, in the ModelOpt or the compressed-tensors convention (``export.format``; see
:mod:`.writer` for the tensors, :mod:`.formats` for the conventions, :mod:`.hf_names` for the
names and :mod:`.serving` for the tokenizer, chat template and generation config beside them)."""

import dataclasses
import os
from pathlib import Path

from ..config import ConfigError, QADConfig
from .hf_names import hf_config
from .serving import IMPORTED_DIR, ServingSource, find_source
from .writer import export_tensors, write_checkpoint


def export(config: QADConfig) -> Path:
    """Load the run's newest student (``checkpoint.save``: latest training checkpoint, else its
    PTQ checkpoint) into one process at TP = PP = EP = 1 (dist checkpoints reshard, so any
    training layout works), and write its export to ``export.dir`` (default
    ``checkpoint.save/hf_nvfp4``), with the tokenizer, chat template and generation config of
    :func:`.serving.find_source` (one printed line says where from, or that there are none).
    Returns the directory.

    The student is always built with megatron.core's local spec, on any device: a student trained
    with the TE spec (``model.transformer_impl: transformer_engine``) has the same dist-checkpoint
    tensors, because the local layers give their norms the sharded keys of TE's fused ones
    (``input_layernorm.weight`` is ``self_attention.linear_qkv.layer_norm_weight``; an MoE layer's
    pre-MLP norm, the one name that differs, is read under TE's: see ``train.checkpointing``), and
    both specs quantize the same layers with the same scales. Grouped-GEMM experts
    (``model.moe_grouped_gemm``, TE spec) load as the local spec's per-expert layers, which share
    their sharded keys."""
    from .. import parallel, quantize
    from ..models import DTYPES, build_model
    from ..train import checkpointing
    from ..train.preflight import check_output_dir

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("export runs as one process (it gathers every shard); start it without torchrun")
    single = dataclasses.replace(config.parallel, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                 virtual_pipeline_model_parallel_size=1, expert_model_parallel_size=1,
                                 context_parallel_size=1)
    model_cfg = dataclasses.replace(config.model, transformer_impl="local", moe_grouped_gemm=False)
    source = checkpointing.student_checkpoint(config.checkpoint.save)
    out_dir = config.export.dir or Path(config.checkpoint.save) / "hf_nvfp4"
    check_output_dir(out_dir, "export.dir")  # before the model is built and loaded
    context = parallel.initialize(single, seed=config.model.seed)
    try:
        model = build_model(model_cfg, single, context.device)
        hf_config(model_cfg, model.config)  # ConfigError for what the HF architecture cannot hold, before loading
        quantize.apply(model, config.quantization.to_policy())
        checkpointing.load_model([model], source)
        serving = find_source(config)
        print(_serving_line(serving), flush=True)
        return write_checkpoint(model, model_cfg, out_dir, DTYPES[config.export.dtype],
                                max_shard_bytes=int(config.export.max_shard_gib * 2**30),
                                export_format=config.export.format,
                                serving_source=serving.directory if serving else None)
    finally:
        parallel.destroy()


def _serving_line(serving: ServingSource | None) -> str:
    """The one line ``export`` prints on where the tokenizer, chat template and generation config come from."""
    if serving is None:
        return (f"export: no tokenizer, chat template or generation_config.json to copy: teacher.checkpoint has no "
                f"{IMPORTED_DIR}/ (written by 'megatron-qad import') and no data source names a Hugging Face "
                f"tokenizer directory; the export holds the weights and config.json only")
    return f"export: tokenizer, chat template and generation config from '{serving.directory}' ({serving.key})"


__all__ = ["export", "export_tensors", "write_checkpoint"]
