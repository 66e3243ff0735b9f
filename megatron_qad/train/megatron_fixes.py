"""Fixes for the megatron-core 0.19.2 wheel that ``pretrain`` needs on any device.

Each is installed by :func:`apply` before ``pretrain`` runs (idempotent) and says what it
replaces and why. The first two change nothing a run computes; the third makes a resumed
distributed-optimizer run compute what the uninterrupted one does; the fourth lets a resume change
the learning rate as Megatron's ``--override-opt_param-scheduler`` /
``--use-checkpoint-opt_param-scheduler`` say. :func:`formattable_help` is applied to Megatron's
parser instead, where the arguments are parsed (:func:`megatron_qad.train.arguments.parse_megatron_args`).
"""

import argparse
import functools

import torch

_SCHEDULE_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")
"""The param-group values megatron.core's LR / weight-decay schedule reads per group: they follow
``--lr`` / ``--min-lr`` (and their per-group overrides), so a resume that changes those changes them."""


def use_shipped_dataset_helpers() -> None:
    """Keep ``initialize_megatron`` from rebuilding megatron.core's dataset index helpers.

    ``pretrain`` runs ``make`` in ``megatron/core/datasets`` on rank 0 and exits when it fails;
    the wheel ships the built extension (``helpers_cpp``) but not its Makefile, so the build always
    fails there. Where the built extension imports, the rebuild is skipped."""
    from megatron.core.datasets import utils as dataset_utils

    try:
        import megatron.core.datasets.helpers_cpp  # noqa: F401
    except ImportError:
        return
    dataset_utils.compile_helpers = lambda: None


def _fresh_optimizer_state_dict(self) -> dict:
    """The non-parameter state of a distributed optimizer that has taken no step yet: its param
    groups with ``step`` 0 (what a resume's template needs; the checkpoint's values replace them)."""
    inner = self.optimizer.state_dict()
    state_dict = {"optimizer": {key: value for key, value in inner.items() if key != "state"}}
    for group in state_dict["optimizer"]["param_groups"]:
        del group["params"]
        group["step"] = 0
    if self.grad_scaler:
        state_dict["grad_scaler"] = self.grad_scaler.state_dict()
    return state_dict


def resume_distributed_optimizer_with_torch_adam() -> None:
    """Let the distributed optimizer resume with torch's Adam (no Transformer Engine or Apex).

    Megatron's ``load_checkpoint`` builds the optimizer's sharded state dict from the freshly built
    optimizer, whose ``state_dict()`` reads the Adam step from torch's per-parameter state and
    asserts there is exactly one value; before the first step there is none, so every resume of a
    DP > 1 run with the distributed optimizer failed (``assert len(steps) == 1``). With TE's or
    Apex's Adam megatron.core takes the step from the param groups and allows none; here a fresh
    optimizer reports step 0 the same way."""
    from megatron.core.optimizer import distrib_optimizer

    optimizer_class = distrib_optimizer.DistributedOptimizer
    if getattr(optimizer_class.state_dict, "fresh_state_fix", False) or distrib_optimizer.HAVE_APEX_OR_TE:
        return
    original = optimizer_class.state_dict

    def state_dict(self):
        if not self.optimizer.state:
            return _fresh_optimizer_state_dict(self)
        return original(self)

    state_dict.fresh_state_fix = True
    optimizer_class.state_dict = state_dict


def restore_step_counts(optimizer: torch.optim.Optimizer, step: float) -> None:
    """Give every parameter of a torch Adam its own ``step`` tensor holding ``step``."""
    for state in optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].new_tensor(float(step))


def resume_distributed_optimizer_step_counts() -> None:
    """Make ``DistributedOptimizer.load_state_dict`` (no TE / Apex) restore the checkpoint's Adam step.

    Without TE or Apex, torch's Adam keeps a ``step`` tensor per parameter; megatron.core saves
    one value in the param groups and, on load, (1) puts ONE shared step tensor in every
    parameter's state, which torch's Adam then increments once per parameter at every step, and
    (2) in the ``dp_reshardable`` format (the default), copies each parameter's step from the
    load template, i.e. 0, over it. A resumed run thus restarted Adam's bias correction
    (measured on 2 x H200: DP=2 losses up to 27 % off the uninterrupted run from the second step
    after the resume). After the load, every parameter gets its own step tensor holding the
    checkpoint's value (the param groups' ``step``)."""
    from megatron.core.optimizer import distrib_optimizer

    optimizer_class = distrib_optimizer.DistributedOptimizer
    if getattr(optimizer_class.load_state_dict, "step_counts_fix", False) or distrib_optimizer.HAVE_APEX_OR_TE:
        return
    original = optimizer_class.load_state_dict

    def load_state_dict(self, state_dict):
        result = original(self, state_dict)
        groups = state_dict.get("optimizer", {}).get("param_groups", []) if isinstance(state_dict, dict) else []
        steps = {group["step"] for group in groups if "step" in group}
        if len(steps) == 1:  # megatron.core's load asserts exactly one
            restore_step_counts(self.optimizer, steps.pop())
        return result

    load_state_dict.step_counts_fix = True
    optimizer_class.load_state_dict = load_state_dict


def _saved_param_groups(state_dict) -> list | None:
    """The param groups of a megatron.core optimizer's loaded state dict: at its top (the FP32
    optimizer) or under ``optimizer`` (the mixed-precision and distributed optimizers)."""
    if not isinstance(state_dict, dict):
        return None
    if "param_groups" in state_dict:
        return state_dict["param_groups"]
    for key in ("optimizer", "optimizer_state_dict"):
        if isinstance(state_dict.get(key), dict) and "param_groups" in state_dict[key]:
            return state_dict[key]["param_groups"]
    return None


def align_schedule_values(current: list[dict], saved: list[dict], keep_new: bool) -> None:
    """Give each of an optimizer's ``current`` param groups and its ``saved`` counterpart the same
    :data:`_SCHEDULE_KEYS` values: the current ones (``keep_new``) or the saved ones.

    Groups are paired by megatron.core's identifier (``param_group_identifier_keys``) without
    those values; a group without exactly one counterpart is left as it is (megatron.core's load
    then reports it)."""
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    structural = [key for key in param_group_identifier_keys if key not in _SCHEDULE_KEYS]

    def identifier(group: dict) -> tuple:
        return tuple(group.get(key, group.get(f"pre_{key}")) for key in structural)

    by_identifier: dict[tuple, list[dict]] = {}
    for group in saved:
        by_identifier.setdefault(identifier(group), []).append(group)
    for group in current:
        counterparts = by_identifier.get(identifier(group), [])
        if len(counterparts) != 1:
            continue
        source, target = (group, counterparts[0]) if keep_new else (counterparts[0], group)
        for key in _SCHEDULE_KEYS:
            if key in source:
                target[key] = source[key]
            else:
                target.pop(key, None)


def resume_with_a_changed_lr() -> None:
    """Let a resume change ``--lr`` / ``--min-lr`` as Megatron's scheduler flags say.

    megatron.core keeps each param group's ``max_lr`` / ``min_lr`` (from ``--lr`` / ``--min-lr``)
    in the optimizer's state, pairs the saved groups with the new ones by a key that includes them,
    and its schedule takes the LR from the group's values. A resume with another ``--lr`` therefore
    failed in the optimizer's load (``ValueError: Could not find parameter group with key``) even
    with ``--override-opt_param-scheduler`` or ``--use-checkpoint-opt_param-scheduler``, which only
    decide the scheduler's own values. Before every optimizer load the saved and the new groups are
    given the same values (:func:`align_schedule_values`): the new ones with
    ``--override-opt_param-scheduler``, the checkpoint's with ``--use-checkpoint-opt_param-scheduler``
    (the scheduler then uses the same); without either nothing changes, and Megatron compares as before."""
    from megatron.core.optimizer import distrib_optimizer, optimizer

    for optimizer_class in (optimizer.FP32Optimizer, optimizer.Float16OptimizerWithFloat16Params,
                            distrib_optimizer.DistributedOptimizer):
        if getattr(optimizer_class.load_state_dict, "schedule_values_fix", False):
            continue
        optimizer_class.load_state_dict = _aligning_load(optimizer_class.load_state_dict)


def _aligning_load(original):
    """``original`` (an optimizer class's ``load_state_dict``) preceded by :func:`align_schedule_values`
    as Megatron's global arguments ask (the marks of the other fixes kept)."""

    @functools.wraps(original)
    def load_state_dict(self, state_dict):
        from megatron.training.global_vars import get_args

        args, saved = get_args(), _saved_param_groups(state_dict)
        if saved is not None and (args.override_opt_param_scheduler or args.use_checkpoint_opt_param_scheduler):
            align_schedule_values(self.optimizer.param_groups, saved, keep_new=args.override_opt_param_scheduler)
        return original(self, state_dict)

    load_state_dict.schedule_values_fix = True
    return load_state_dict


def apply() -> None:
    """Install the fixes."""
    use_shipped_dataset_helpers()
    resume_distributed_optimizer_with_torch_adam()
    resume_distributed_optimizer_step_counts()
    resume_with_a_changed_lr()


def formattable_help(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make every help string of ``parser`` formattable, so that ``--help`` prints instead of failing.

    argparse formats each help string with ``%`` (``%(default)s``); megatron-core 0.19.2 takes
    some help texts from its config dataclasses' docstrings, and the one of
    ``--moe-paged-stash-buffer-size-factor-cuda`` holds a bare ``%``, so ``--help`` ended in
    ``ValueError: unsupported format character``. A help string that does not format has its
    ``%`` escaped (shown as written); the others are left as they are. Returns ``parser``."""
    for action in parser._actions:
        if not isinstance(action.help, str) or "%" not in action.help:
            continue
        try:
            action.help % dict(vars(action), prog=parser.prog)
        except (ValueError, TypeError, KeyError):
            action.help = action.help.replace("%", "%%")
    return parser
