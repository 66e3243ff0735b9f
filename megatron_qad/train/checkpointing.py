"""Model checkpoints (teachers, PTQ students) as megatron.core dist checkpoints, and reading the
model out of Megatron-LM checkpoint directories.

Training checkpoints are Megatron-LM's own (``megatron.training.checkpointing``, written by
``pretrain`` at ``--save``)::

    RUN/latest_checkpointed_iteration.txt   the newest complete iteration, e.g. "100"
    RUN/iter_0000100/                       torch_dist: model, optimizer, LR schedule, RNG, args

Megatron writes the tracker only after the iteration's checkpoint is complete, so a crash
mid-save leaves the previous one as the newest. :func:`load_model` reads the model of either a
bare dist checkpoint (:func:`save_model`'s, ``metadata.json``) or such a directory (its newest
iteration), so a Megatron-LM checkpoint of a BF16 model is a teacher as it is, and a QAD
student's checkpoint loads in Megatron-LM with ``--load``.

Tensors are stored under their global (layout-free) names, so a checkpoint written at one TP / PP /
EP layout loads at another. :func:`save_model` writes atomically (``DIR.tmp``, then a rename).

A model checkpoint also loads across megatron.core's two layer specs. They name every tensor alike
in dist checkpoints (the local spec's norms take the names of TE's fused ones, per-expert and
grouped-GEMM experts share theirs) but one: the pre-MLP norm of an MoE layer, a separate norm in
the TE spec (``pre_mlp_layernorm.weight``), which the local spec names as a dense layer's fused norm
(``mlp.linear_fc1.layer_norm_weight``). :func:`load_model` reads a tensor the checkpoint lacks
under the other spec's name (:data:`SPEC_KEY_ALIASES`), and leaves Transformer Engine's per-module
extra state (``_extra_state``: FP8 metadata, which a local-spec checkpoint has none of) as it is
where the checkpoint has none.
"""

import os
import pickle
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedObject
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

from ..checkpoint_tracker import MEGATRON_LATEST, has_tracker
from ..config import ConfigError
from ..distill import TeacherStudentStage, innermost
from .checkpoint_checks import check_checkpoint_files, check_fits_model


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
    """Load weights written by :func:`save_model`, or the model of a Megatron-LM checkpoint
    directory (its newest iteration, :func:`resolve_checkpoint`), into ``chunks`` at this run's
    layout. Every rank of the job must call it.

    ``strict=False`` skips tensors the checkpoint does not have (a BF16 teacher's weights loaded
    into a quantized student keep the student's amax buffers). The checkpoint may come from a
    model of the other layer spec (see the module doc). Before anything is read, ConfigError names
    a missing or cut file of the checkpoint, or the recipe keys whose values disagree with the
    shapes of its tensors (:mod:`.checkpoint_checks`)."""
    directory = resolve_checkpoint(directory)
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


def has_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory`` holds a checkpoint :func:`resolve_checkpoint` takes: a bare
    megatron.core dist checkpoint (``metadata.json``) or a Megatron-LM checkpoint directory."""
    return (Path(directory) / "metadata.json").is_file() or has_tracker(directory)


def resolve_checkpoint(directory: str | Path) -> Path:
    """The dist checkpoint a directory stands for: itself (a bare megatron.core dist checkpoint,
    ``metadata.json``), or the newest iteration of a Megatron-LM checkpoint directory
    (``latest_checkpointed_iteration.txt`` -> ``iter_NNNNNNN`` or ``release``). ConfigError names
    the file when neither is there or the tracker is damaged."""
    directory = Path(directory)
    tracker = directory / MEGATRON_LATEST
    if tracker.is_file():
        try:
            text = tracker.read_text().strip()
        except (UnicodeDecodeError, OSError) as err:
            raise ConfigError(f"'{tracker}' cannot be read as text ({err.__class__.__name__}); restore it, "
                              f"or write the newest iteration number into it") from None
        name = "release" if text == "release" else (f"iter_{int(text):07d}" if text.isdigit() else None)
        if name is None:
            raise ConfigError(f"'{tracker}' holds {text[:40]!r}, not an iteration number or 'release'; "
                              f"write the newest iteration number into it")
        resolved = directory / name
        if not (resolved / "metadata.json").is_file():
            raise ConfigError(f"'{tracker}' names '{name}', which is not a complete checkpoint; restore it "
                              f"or point the tracker at an older iteration")
        return resolved
    if (directory / "metadata.json").is_file():
        return directory
    raise ConfigError(f"no checkpoint at '{directory}' (neither {MEGATRON_LATEST} nor a dist checkpoint's "
                      f"metadata.json); check 'teacher.checkpoint' / --qad-teacher-load")


def student_checkpoint(run_dir: str | Path | None) -> Path:
    """The newest student of a run: its latest Megatron-LM training checkpoint, else its ``ptq/``."""
    if has_tracker(run_dir):
        return resolve_checkpoint(run_dir)
    if run_dir and (Path(run_dir) / "ptq" / "metadata.json").is_file():
        return Path(run_dir) / "ptq"
    raise ConfigError(f"'checkpoint.save' ({run_dir}) holds no student checkpoint (neither {MEGATRON_LATEST} "
                      f"nor ptq/); run 'megatron-qad train' or 'megatron-qad ptq' with it first")
