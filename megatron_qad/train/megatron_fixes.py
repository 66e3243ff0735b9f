"""Fixes for the megatron-core 0.19.2 wheel that ``pretrain`` needs on any device.

Each is installed by :func:`apply` before ``pretrain`` runs (idempotent) and says what it
replaces and why. The first two change nothing a run computes; the third makes a resumed
distributed-optimizer run compute what the uninterrupted one does.
"""

import torch



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


def apply() -> None:
    """Install the fixes."""
    use_shipped_dataset_helpers()
    resume_distributed_optimizer_with_torch_adam()
    resume_distributed_optimizer_step_counts()
