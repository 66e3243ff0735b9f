"""The import verb: a Hugging Face checkpoint -> a megatron.core dist checkpoint + its recipe.

Nothing is written before the whole import is known to work: the family, every config.json field
that changes the math, the recipe, the output directory, and every tensor's name and shape are
checked first. The weights then stream: the Megatron model is built once (one process, in host
memory also where a GPU is visible, TP = PP = 1, megatron.core's local spec, ``model.params_dtype``), each safetensors file is read
one tensor at a time into the Megatron tensors it fills (fused QKV rows per query group, gated
fc1 halves), and :func:`megatron_qad.train.checkpointing.save_model` writes the dist checkpoint
(global tensor names: it loads at any TP / PP / EP layout, and into the TE spec). Host memory peaks
near the model in ``params_dtype`` plus the pages of the file being read.
"""

import dataclasses
import os
import re
import shutil
from pathlib import Path

import yaml

from ..config import ConfigError, ModelConfig, ParallelConfig, config_from_dict
from ..export.hf_names import piece_row_count, put_rows
from ..export.serving import import_serving_files
from .family import Family, HFConfig, family_for
from .reader import CONFIG, HFCheckpoint, open_checkpoint

MODEL_YAML = "model.yaml"
RECIPE_YAML = "recipe.yaml"
BLOCKS_FILE = "heterogeneous_layers_config.json"
"""The copy of a DeciLM checkpoint's config.json (its ``block_configs``) that the imported
``model.heterogeneous_layers_config`` names."""
RUNTIME_FIELDS = ("seq_length", "params_dtype", "seed", "init_method_std", "transformer_impl", "core_attention",
                  "moe_grouped_gemm",
                  "moe_token_dispatcher_type", "moe_router_bias_update_rate")
"""``model`` fields that are choices of the run, not of the architecture: a base recipe's values are kept."""
_NO_COUNTERPART = (r"\._extra_state$",)
"""Megatron state-dict entries that no HF checkpoint holds: Transformer Engine's extra state."""


@dataclasses.dataclass(frozen=True)
class ImportResult:
    """What an import wrote: the dist checkpoint ``directory``, its ``model.yaml``, the full
    ``recipe.yaml`` (with a base recipe; else None), the family, the model config and the names of
    the tokenizer / chat template / generation config files copied into ``directory/hf_tokenizer``
    (empty: none, and no such folder)."""

    directory: Path
    model_yaml: Path
    recipe_yaml: Path | None
    family: str
    model: ModelConfig
    serving_files: list[str]


def import_checkpoint(hf_dir: str | Path, out_dir: str | Path, base_recipe: str | Path | None = None,
                      params_dtype: str | None = None) -> ImportResult:
    """Import the Hugging Face checkpoint at ``hf_dir`` into ``out_dir`` (new or empty).

    Writes the dist checkpoint that ``teacher.checkpoint: OUT_DIR`` loads, ``OUT_DIR/model.yaml``
    (the recipe's ``model:`` section; a DeciLM model's names ``OUT_DIR/`` :data:`BLOCKS_FILE`, a copy
    of its config.json), ``OUT_DIR/hf_tokenizer/``: the tokenizer, chat template and generation
    config that an export of the model serves with (:mod:`megatron_qad.export.serving`) and, with
    ``base_recipe``, ``OUT_DIR/recipe.yaml``: the base
    recipe with its model section replaced (its run-time model fields, :data:`RUNTIME_FIELDS`, kept)
    and ``teacher.checkpoint`` set to ``out_dir``. ``params_dtype`` ("bfloat16" / "float32"; None:
    the base recipe's, else float32 for a float32 checkpoint and bfloat16 otherwise) is the dtype
    of the written tensors. Raises ConfigError, before writing anything, for an architecture or a
    config.json value megatron_qad cannot reproduce (naming the field), missing or unexpected
    tensors (naming them), and a bad base recipe or output directory."""
    checkpoint = open_checkpoint(hf_dir)
    hf_config = HFConfig(checkpoint.config, str(Path(hf_dir) / CONFIG))
    family = family_for(hf_config)
    base = _read_recipe(base_recipe) if base_recipe else {}
    model_section = _model_section(family.model_fields(hf_config), base.get("model") or {},
                                   params_dtype, _checkpoint_dtype(hf_config))
    out = Path(out_dir).resolve()
    recipe = {**base, "model": model_section, "teacher": {**(base.get("teacher") or {}), "checkpoint": str(out)}}
    model_cfg = config_from_dict(recipe, source=f"the recipe imported from {hf_dir}").model
    _check_output_dir(out)
    _write_weights(checkpoint, family, model_cfg, out)
    if model_section.get("heterogeneous_layers_config"):  # the recipe reads the copy, not the source
        copy = out / BLOCKS_FILE
        shutil.copyfile(model_section["heterogeneous_layers_config"], copy)
        model_section["heterogeneous_layers_config"] = str(copy)  # also recipe["model"]
        model_cfg = dataclasses.replace(model_cfg, heterogeneous_layers_config=str(copy))
    serving_files = import_serving_files(Path(hf_dir), checkpoint.config, out)
    header = f"# imported from {Path(hf_dir).resolve()} ({family.name})\n"
    model_yaml = out / MODEL_YAML
    model_yaml.write_text(header + yaml.safe_dump({"model": model_section}, sort_keys=False))
    recipe_yaml = None
    if base_recipe:
        recipe_yaml = out / RECIPE_YAML
        recipe_yaml.write_text(header + f"# base recipe {Path(base_recipe).resolve()}\n"
                               + yaml.safe_dump(recipe, sort_keys=False))
    return ImportResult(out, model_yaml, recipe_yaml, family.name, model_cfg, serving_files)


def _read_recipe(path: str | Path) -> dict:
    """The base recipe's sections as plain data (validated later, with the imported model)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"base recipe '{path}' not found; pass a YAML recipe, e.g. configs/tiny_cpu.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse '{path}' as YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"'{path}' must hold a mapping of sections (model:, parallel:, ...)")
    return data


def _checkpoint_dtype(hf_config: HFConfig) -> str:
    """float32 for a float32 checkpoint (``dtype`` / ``torch_dtype``), else bfloat16 (the teacher's dtype)."""
    dtype = hf_config.get("dtype", hf_config.get("torch_dtype", "bfloat16"))
    return "float32" if dtype == "float32" else "bfloat16"


def _model_section(fields: dict, base_model: dict, params_dtype: str | None, checkpoint_dtype: str) -> dict:
    """The architecture ``fields`` plus the run-time fields (the base's, else defaults; the
    ``params_dtype`` given, else the base's, else ``checkpoint_dtype``), in ModelConfig field order."""
    runtime = {name: base_model[name] for name in RUNTIME_FIELDS if name in base_model}
    runtime["params_dtype"] = params_dtype or runtime.get("params_dtype", checkpoint_dtype)
    merged = {**fields, **runtime}
    return {f.name: merged[f.name] for f in dataclasses.fields(ModelConfig) if f.name in merged}


def _check_output_dir(out: Path) -> None:
    """ConfigError unless ``out`` is new or an empty directory that can be created (no regular file
    on its way)."""
    from ..train.preflight import check_output_dir

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output directory '{out}' exists and is not empty; pass a new directory to --out")
    check_output_dir(out, "--out")


def _write_weights(checkpoint: HFCheckpoint, family: Family, model_cfg: ModelConfig, out: Path) -> None:
    """Build the model in this process, check the tensor plan, fill it file by file and save it."""
    from .. import parallel
    from ..models import build_model
    from ..train.checkpointing import save_model

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("import runs as one process; start it without torchrun")
    single = ParallelConfig()
    model_cfg = dataclasses.replace(model_cfg, transformer_impl="local", moe_grouped_gemm=False)
    # The process group is the machine's usual one (NCCL where a GPU is visible: megatron_qad's CPU
    # shims refuse to run there), but the model lives in host memory, which holds larger models.
    parallel.initialize(single, seed=model_cfg.seed)
    try:
        model = build_model(model_cfg, single, "cpu")
        state = model.state_dict()
        plan = _plan(checkpoint, family, model_cfg, state)
        filled = {name: 0 for name in state if name in {target for target, _ in plan.values()}}
        for file in checkpoint.files:
            for hf_name, tensor in checkpoint.read(file):
                if hf_name in plan:
                    target, piece = plan[hf_name]
                    put_rows(state[target], piece, model_cfg.num_query_groups, tensor)
                    filled[target] += tensor.shape[0]
        unfilled = [name for name, rows in filled.items() if rows != state[name].shape[0]]
        if unfilled:
            raise RuntimeError(f"the import left rows of {unfilled[:5]} unfilled; the name table maps them wrongly")
        save_model([model], out)
    finally:
        parallel.destroy()


def _plan(checkpoint: HFCheckpoint, family: Family, model_cfg: ModelConfig, state: dict) -> dict:
    """{HF tensor name: (Megatron tensor name, Piece)} after checking names and shapes (ConfigError
    naming the missing, unexpected or misshapen tensors)."""
    names = [name for name in state if not any(re.search(pattern, name) for pattern in _NO_COUNTERPART)]
    sources = family.tensor_sources(model_cfg, names)
    lacking = [name for name in names if name not in sources]
    if lacking:
        raise RuntimeError(f"family {family.name!r} maps no Hugging Face tensor to {lacking[:5]}")
    plan = {hf_name: (name, piece) for name in names for hf_name, piece in sources[name]}
    where = checkpoint.directory
    missing = sorted(set(plan) - set(checkpoint.tensors))
    if missing:
        raise ConfigError(f"'{where}' lacks {len(missing)} tensor(s) that its config.json implies: "
                          f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; check the download")
    ignored = list(family.ignored_tensors)
    if model_cfg.share_embeddings_and_output_weights:
        ignored.append(r"^lm_head\.weight$")  # tied: HF reads the embedding, as megatron.core does
    unexpected = sorted(name for name in checkpoint.tensors
                        if name not in plan and not any(re.search(pattern, name) for pattern in ignored))
    if unexpected:
        raise ConfigError(f"'{where}' holds {len(unexpected)} tensor(s) that the {family.name} architecture of its "
                          f"config.json has no place for: {', '.join(unexpected[:5])}"
                          f"{' ...' if len(unexpected) > 5 else ''}")
    for hf_name, (name, piece) in plan.items():
        target = state[name]
        expected = (piece_row_count(piece, target.shape[0], model_cfg.num_query_groups), *target.shape[1:])
        found = checkpoint.tensors[hf_name].shape
        if found != expected:
            raise ConfigError(f"tensor '{hf_name}' in '{where}' has shape {list(found)} but the model of its "
                              f"config.json needs {list(expected)} (for {name}); config.json and weights disagree")
    return plan
