"""Model and training checkpoints as megatron.core dist checkpoints, written atomically.

Layout of a run directory (``checkpoint.save``)::

    RUN/config.yaml           the resolved recipe of the run
    RUN/latest.txt            name of the newest complete checkpoint, e.g. "iter_0000100"
    RUN/iter_0000100/         a dist checkpoint: model chunks, optimizer, LR schedule, iteration

A checkpoint is written to ``iter_N.tmp`` and renamed to ``iter_N`` by rank 0 only after every
rank has finished writing; ``latest.txt`` is then replaced atomically. A crash mid-save leaves the
previous checkpoint and ``latest.txt`` untouched (a stale ``.tmp`` is removed by the next save).

Tensors are stored under their global (layout-free) names, so a checkpoint written at one TP / PP /
EP layout loads at another. A model checkpoint (the teacher) holds the chunks' weights only.

A model checkpoint also loads across megatron.core's two layer specs. They name every tensor alike
in dist checkpoints (the local spec's norms take the names of TE's fused ones, per-expert and
grouped-GEMM experts share theirs) but one: the pre-MLP norm of an MoE layer, a separate norm in
the TE spec (``pre_mlp_layernorm.weight``), which the local spec names as a dense layer's fused norm
(``mlp.linear_fc1.layer_norm_weight``). :func:`load_model` reads a tensor the checkpoint lacks
under the other spec's name (:data:`SPEC_KEY_ALIASES`), and leaves Transformer Engine's per-module
extra state (``_extra_state``: FP8 metadata, which a local-spec checkpoint has none of) as it is
where the checkpoint has none.
"""

import json
import os
import pickle
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedObject
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

from ..config import ConfigError
from ..distill import TeacherStudentStage, innermost
from .checkpoint_checks import check_checkpoint_files, check_fits_model

LATEST = "latest.txt"
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
"""How the distributed optimizer stores its state: one tensor per parameter state, gathered on
data-parallel rank 0 when saving, so a checkpoint reloads at another layout (megatron.core's
default flattened format cannot be written by its dist checkpointing any more). Other
optimizers ignore it."""


def bare_model(chunk: torch.nn.Module) -> torch.nn.Module:
    """The megatron.core model inside ``chunk``: under DDP (``.module``) and, for a teacher-student
    stage, its student. Checkpoints hold bare models' tensors, so a student checkpoint loads as a
    plain model."""
    chunk = innermost(chunk)
    return chunk.student if isinstance(chunk, TeacherStudentStage) else chunk


SPEC_KEY_ALIASES = (("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"),)
"""Pairs of dist-checkpoint key parts that name one tensor in megatron.core's TE and local specs."""


def _read_under_spec_aliases(chunk_state: dict, saved_keys: set[str]) -> None:
    """Point each tensor of ``chunk_state`` (a sharded state dict) that the checkpoint (its keys:
    ``saved_keys``) lacks at its name in the other layer spec, where the checkpoint has that."""
    for value in chunk_state.values():
        key = getattr(value, "key", None)
        if key is None or key in saved_keys:
            continue
        for te_part, local_part in SPEC_KEY_ALIASES:
            for ours, theirs in ((te_part, local_part), (local_part, te_part)):
                alias = key.replace(f".{ours}", f".{theirs}", 1)
                if alias != key and alias in saved_keys:
                    value.key = alias


def _lacking_extra_states(chunk_state: dict, saved_keys: set[str]) -> set[str]:
    """The entries of ``chunk_state`` that are Transformer Engine extra states the checkpoint lacks."""
    return {name for name, value in chunk_state.items()
            if isinstance(value, ShardedObject) and value.key.endswith("_extra_state") and value.key not in saved_keys}


def _model_state(chunks) -> dict:
    """{"model{i}": chunk i's sharded state dict} (keys differ from a plain state dict's)."""
    return {f"model{index}": bare_model(chunk).sharded_state_dict() for index, chunk in enumerate(chunks)}


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _save_atomically(state: dict, directory: Path) -> None:
    """dist_checkpointing.save ``state`` into ``directory`` via ``directory.tmp`` and a rename."""
    tmp = directory.with_name(directory.name + ".tmp")
    if _is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(state, str(tmp))
    _barrier()
    if _is_rank0():
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    _barrier()


def save_model(chunks, directory: str | Path) -> None:
    """Write the chunks' weights (e.g. a teacher) as a dist checkpoint at ``directory``."""
    _save_atomically(_model_state(chunks), Path(directory))


def load_model(chunks, directory: str | Path, strict: bool = True) -> None:
    """Load weights written by :func:`save_model` (or the ``model`` part of a training checkpoint)
    into ``chunks`` at this run's layout. Every rank of the job must call it.

    ``strict=False`` skips tensors the checkpoint does not have (a BF16 teacher's weights loaded
    into a quantized student keep the student's amax buffers). The checkpoint may come from a
    model of the other layer spec (see the module doc). Before anything is read, ConfigError names
    a missing or cut file of the checkpoint, or the recipe keys whose values disagree with the
    shapes of its tensors (:mod:`.checkpoint_checks`)."""
    directory = Path(directory)
    if not (directory / "metadata.json").is_file():
        raise ConfigError(f"no megatron.core dist checkpoint at '{directory}' (metadata.json missing); "
                          f"check 'teacher.checkpoint', or set 'teacher.pretrain_iters' to train one there")
    check_checkpoint_files(directory)
    state = _model_state(chunks)
    saved = load_sharded_metadata(str(directory))
    saved_keys = {value.key for value in saved.values()}
    lacking = {}
    for name, chunk_state in state.items():
        _read_under_spec_aliases(chunk_state, saved_keys)
        lacking[name] = _lacking_extra_states(chunk_state, saved_keys)
        check_fits_model(chunk_state, saved, directory, strict)
        kept = {key: value for key, value in chunk_state.items()
                if key not in lacking[name] and (strict or getattr(value, "key", None) in saved_keys)}
        state[name] = kept
    try:
        loaded = dist_checkpointing.load(state, str(directory))
    except (EOFError, pickle.UnpicklingError) as error:  # a file garbled inside, not cut short
        raise ConfigError(f"checkpoint '{directory}' is damaged: a file of it cannot be read "
                          f"({type(error).__name__}: {error}); copy it again or re-create it") from None
    for index, chunk in enumerate(chunks):
        name = f"model{index}"
        result = bare_model(chunk).load_state_dict(loaded[name], strict=False)
        missing = [key for key in result.missing_keys if key not in lacking[name]]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"checkpoint '{directory}' does not match the model: missing {missing[:5]}, "
                               f"unexpected {result.unexpected_keys[:5]}")


def save_training(run_dir: str | Path, iteration: int, chunks, optimizer, scheduler) -> Path:
    """Write the student chunks, optimizer and LR-schedule state after ``iteration`` iterations."""
    run_dir = Path(run_dir)
    name = f"iter_{iteration:07d}"
    state = _model_state(chunks)
    state["optimizer"] = optimizer.sharded_state_dict(_flat_model_state(state), metadata=OPTIMIZER_METADATA)
    state["scheduler"] = scheduler.state_dict()
    state["iteration"] = iteration
    _save_atomically(state, run_dir / name)
    _write_text(run_dir / LATEST, name + "\n")
    return run_dir / name


def _flat_model_state(state: dict) -> dict:
    """The chunks' sharded state dicts merged (the optimizer maps parameters to these tensors)."""
    flat = {}
    for index, chunk_state in state.items():
        flat.update({f"{index}.{key}": value for key, value in chunk_state.items()})
    return flat


def latest_training_checkpoint(run_dir: str | Path | None) -> Path | None:
    """The newest complete checkpoint of ``run_dir`` (from ``latest.txt``), or None."""
    if run_dir is None or not (Path(run_dir) / LATEST).is_file():
        return None
    directory = Path(run_dir) / (Path(run_dir) / LATEST).read_text().strip()
    if not (directory / "metadata.json").is_file():
        raise ConfigError(f"'{Path(run_dir) / LATEST}' names '{directory.name}', which is not a complete "
                          f"checkpoint; restore it or delete {LATEST} to start over")
    return directory


def student_checkpoint(run_dir: str | Path | None) -> Path:
    """The newest student of a run: its latest training checkpoint, else its ``ptq/`` checkpoint."""
    source = latest_training_checkpoint(run_dir)
    if source is None and run_dir and (Path(run_dir) / "ptq" / "metadata.json").is_file():
        source = Path(run_dir) / "ptq"
    if source is None:
        raise ConfigError(f"'checkpoint.save' ({run_dir}) holds no student checkpoint (neither {LATEST} "
                          f"nor ptq/); run 'megatron-qad train' or 'megatron-qad ptq' with it first")
    return source


def load_training(directory: Path, chunks, optimizer, scheduler) -> int:
    """Restore what :func:`save_training` wrote into ``chunks``, ``optimizer`` and ``scheduler``;
    return the iteration it was written after."""
    state = _model_state(chunks)
    state["optimizer"] = optimizer.sharded_state_dict(_flat_model_state(state), is_loading=True,
                                                      metadata=OPTIMIZER_METADATA)
    state["scheduler"] = scheduler.state_dict()
    state["iteration"] = 0
    loaded = dist_checkpointing.load(state, str(directory))
    for index, chunk in enumerate(chunks):
        bare_model(chunk).load_state_dict(loaded[f"model{index}"])
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    return int(loaded["iteration"])


def _write_text(path: str | Path, text: str) -> None:
    """Write ``text`` at ``path`` atomically (rank 0 writes ``path.tmp`` and renames it; all wait)."""
    if _is_rank0():
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    _barrier()


def write_json(path: str | Path, record: dict) -> None:
    """Write ``record`` as JSON at ``path`` atomically (rank 0)."""
    _write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def write_resolved_config(run_dir: str | Path, config_dict: dict) -> None:
    """Save the resolved recipe as ``RUN/config.yaml`` (rank 0)."""
    _write_text(Path(run_dir) / "config.yaml", yaml.safe_dump(config_dict, sort_keys=False))

