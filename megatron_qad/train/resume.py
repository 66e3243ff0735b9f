"""A resume checked against the checkpoint it continues, before Megatron loads anything.

Megatron-LM's ``load_checkpoint`` compares the LR / weight-decay schedule its arguments build
with the one saved in the checkpoint (megatron.core's ``OptimizerParamScheduler``) and, unless
``--override-opt_param-scheduler`` (take the new values) or ``--use-checkpoint-opt_param-scheduler``
(keep the checkpoint's) is given, fails with an ``AssertionError`` traceback after the model and
optimizer were built. :func:`check_resume` reads the checkpoint's saved schedule and arguments
first (its common state, without any tensor) and instead

* refuses in one line (ConfigError) naming the settings that changed, old -> new, and the fix;
* or, with one of the two flags, prints one line saying which values differ and which apply;
* applies a changed ``train_iters`` that the schedule does not depend on (a set
  ``lr_decay_iters`` or a constant LR, and a constant weight decay: only Megatron's weight-decay
  increment length, which then changes nothing, differs), saying so;
* refuses a ``train_iters`` not above the checkpoint's iteration (Megatron would train nothing, or,
  for a run resumed at its last iteration, fail in its data sampler: no samples left to consume).

Messages name recipe keys for ``megatron-qad train`` and Megatron flags for ``scripts/pretrain_qad.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import warnings
from pathlib import Path

from ..checkpoint_tracker import has_tracker
from ..config import ConfigError, TrainingConfig
from .checkpoint_checks import check_checkpoint_files
from .checkpointing import resolve_checkpoint

_FED_BY = {
    "max_lr": ("lr",),
    "min_lr": ("min_lr",),
    "lr_warmup_steps": ("lr_warmup_iters", "lr_warmup_samples", "lr_warmup_fraction", "global_batch_size"),
    "lr_decay_steps": ("lr_decay_iters", "train_iters", "lr_decay_samples", "train_samples", "global_batch_size"),
    "lr_decay_style": ("lr_decay_style",),
    "start_wd": ("start_weight_decay",),
    "end_wd": ("end_weight_decay",),
    "wd_incr_steps": ("train_iters", "train_samples", "global_batch_size"),
    "wd_incr_style": ("weight_decay_incr_style",),
}
"""Per value of megatron.core's scheduler state, the Megatron arguments it is computed from."""


@dataclasses.dataclass(frozen=True)
class _Door:
    """How a front door names the settings in messages: recipe keys, or Megatron flags."""

    recipe: bool

    def name(self, dest: str) -> str:
        """The recipe key (``training.lr``) or Megatron flag (``--lr``) of argument ``dest``."""
        if self.recipe and dest in {f.name for f in dataclasses.fields(TrainingConfig)}:
            return f"training.{dest}"
        return "--" + dest.replace("_", "-")

    def load(self, directory: str) -> str:
        return f"'checkpoint.save' ({directory})" if self.recipe else f"--load {directory}"

    def fix(self) -> str:
        if self.recipe:
            return ("set checkpoint.lr_schedule_on_resume=new to apply the new values, or =checkpoint to keep "
                    "the checkpoint's")
        return ("pass --override-opt_param-scheduler to apply the new values, or "
                "--use-checkpoint-opt_param-scheduler to keep the checkpoint's")

    def nothing_left(self, train_iters: int, iteration: int, directory: str) -> str:
        given, fix = ((f"'training.train_iters' ({train_iters})", f"set training.train_iters above {iteration}")
                      if self.recipe else (f"--train-iters {train_iters}", f"pass --train-iters above {iteration}"))
        elsewhere = "start the run in another checkpoint.save" if self.recipe else "pass another --load"
        return (f"{given} is not above iteration {iteration} of the checkpoint in {self.load(directory)}: nothing "
                f"is left to train; {fix} to train further, or {elsewhere}")


def _schedule(args: argparse.Namespace) -> dict:
    """The state megatron.core's ``OptimizerParamScheduler`` starts with for Megatron arguments
    ``args`` (as Megatron's ``get_optimizer_param_scheduler`` builds it; steps are samples), which
    ``load_checkpoint`` compares with a checkpoint's."""
    if args.train_iters:
        decay_iters = args.train_iters if args.lr_decay_iters is None else args.lr_decay_iters
        decay, wd_steps = decay_iters * args.global_batch_size, args.train_iters * args.global_batch_size
        warmup = args.lr_warmup_iters * args.global_batch_size
    else:
        decay = args.train_samples if args.lr_decay_samples is None else args.lr_decay_samples
        wd_steps, warmup = args.train_samples, args.lr_warmup_samples
    if args.lr_warmup_fraction is not None:
        warmup = args.lr_warmup_fraction * decay
    return {"max_lr": float(args.lr), "min_lr": args.min_lr, "lr_warmup_steps": warmup, "lr_decay_steps": decay,
            "lr_decay_style": args.lr_decay_style, "start_wd": args.start_weight_decay,
            "end_wd": args.end_weight_decay, "wd_incr_steps": wd_steps, "wd_incr_style": args.weight_decay_incr_style}


def _matters(value: str, old: dict, new: dict) -> bool:
    """Whether scheduler value ``value`` changes any LR or weight decay: the weight-decay increment
    does only where start and end differ, the decay length and end only for a decaying LR."""
    if value in ("wd_incr_steps", "wd_incr_style"):
        return old["start_wd"] != old["end_wd"] or new["start_wd"] != new["end_wd"]
    if value in ("lr_decay_steps", "min_lr"):
        return old["lr_decay_style"] != "constant" or new["lr_decay_style"] != "constant"
    return True


def _changed_arguments(old_args, args, values: list[str], door: _Door, decay_changes: bool) -> list[str]:
    """``name old -> new`` for every argument behind scheduler ``values`` that differs;
    ``decay_changes``: the LR decay length changes (a changed train_iters says it sets it)."""
    dests = list(dict.fromkeys(dest for value in values for dest in _FED_BY[value]))
    # The checkpoint's --lr-decay-iters was set to its --train-iters by Megatron when it was null.
    old_decay = old_args.lr_decay_iters if old_args.lr_decay_iters is not None else old_args.train_iters
    changes = {}
    for dest in dests:
        old, new = getattr(old_args, dest, None), getattr(args, dest)
        if dest == "lr_decay_iters":
            if new is None:  # follows train_iters, named there
                continue
            old = old_decay
        if old == new:
            continue
        name = door.name(dest)
        if dest in ("start_weight_decay", "end_weight_decay") and _constant_weight_decay(old_args, args):
            name = door.name("weight_decay")  # what set both (the recipe's only weight decay)
        text = f"{name} {_show(old)} -> {_show(new)}"
        if dest == "train_iters" and args.lr_decay_iters is None and decay_changes:
            null = "training.lr_decay_iters is null" if door.recipe else "no --lr-decay-iters"
            text += f" ({null}: {door.name('train_iters')} is also the number of iterations the LR decays over)"
        changes.setdefault(name, text)
    return list(changes.values())


def _constant_weight_decay(old_args, args) -> bool:
    return (old_args.start_weight_decay == old_args.end_weight_decay
            and args.start_weight_decay == args.end_weight_decay)


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _saved_state(args) -> tuple[int, dict, argparse.Namespace | None] | None:
    """(iteration, scheduler state or None, saved arguments) of the checkpoint Megatron will
    resume from ``args.load``; None where it will resume none (no tracker, 'release', --finetune)."""
    if args.finetune or not has_tracker(args.load):
        return None
    if getattr(args, "ckpt_step", None):
        directory = Path(args.load) / f"iter_{args.ckpt_step:07d}"
    else:
        directory = resolve_checkpoint(args.load)
    if directory.name == "release":
        return None
    check_checkpoint_files(directory)
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": reading needs no group
        warnings.simplefilter("ignore", UserWarning)
        common = load_common_state_dict(str(directory))
    return common["iteration"], common.get("opt_param_scheduler"), common.get("args")


def check_resume(args: argparse.Namespace, recipe_keys: bool = False) -> None:
    """Check the resume of Megatron arguments ``args`` (parsed and validated) against the
    checkpoint ``--load`` names, as the module docstring says; may set
    ``args.override_opt_param_scheduler`` (a changed ``train_iters`` that changes no LR or weight
    decay). ``recipe_keys``: name recipe keys (``megatron-qad train``), else Megatron flags.
    Call it on every rank (it only reads; rank 0 prints)."""
    saved = _saved_state(args)
    if saved is None:
        return
    door = _Door(recipe_keys)
    iteration, old_schedule, old_args = saved
    if args.train_iters is not None and args.train_iters <= iteration:
        raise ConfigError(door.nothing_left(args.train_iters, iteration, args.load))
    if args.no_load_optim or old_schedule is None or old_args is None:
        return  # Megatron loads no schedule to compare
    new_schedule = _schedule(args)
    differ = [value for value in _FED_BY if value in old_schedule and old_schedule[value] != new_schedule[value]]
    if not differ:
        return
    relevant = [value for value in differ if _matters(value, old_schedule, new_schedule)]
    changes = "; ".join(_changed_arguments(old_args, args, relevant or differ, door, "lr_decay_steps" in relevant)
                        or [f"the schedule's {value} {_show(old_schedule[value])} -> {_show(new_schedule[value])}"
                            for value in relevant or differ])
    where = f"{door.load(args.load)} resumes iteration {iteration}"
    if not relevant:
        if not args.use_checkpoint_opt_param_scheduler:
            args.override_opt_param_scheduler = True  # only values that no LR or weight decay uses differ
        message = f"{where} with {changes}, which the LR and weight-decay schedule do not depend on"
    elif args.override_opt_param_scheduler:
        message = f"{where} with the new LR schedule: {changes}"
    elif args.use_checkpoint_opt_param_scheduler:
        longer = f"; the run ends at iteration {args.train_iters}" if old_args.train_iters != args.train_iters else ""
        message = f"{where} with the checkpoint's LR schedule, not the new values: {changes}{longer}"
    else:
        raise ConfigError(f"{where}, which was saved with another LR schedule: {changes}; {door.fix()}")
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, flush=True)
