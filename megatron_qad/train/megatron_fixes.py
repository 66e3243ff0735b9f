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


def separate_step_counts(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter of a torch Adam its own ``step`` tensor (values unchanged).

    After a resume, megatron.core's ``DistributedOptimizer.load_state_dict`` (the path without TE
    or Apex) stores ONE step tensor in every parameter's state; torch's Adam increments each
    parameter's step in place, so the shared tensor grows by the number of parameters per
    optimizer step instead of by one, and every update after a resume used the wrong bias
    correction (measured on 2 x H200: DP=2 losses 9 % off the uninterrupted run from the second
    step after the resume)."""
    for state in optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def resume_distributed_optimizer_step_counts() -> None:
    """Wrap ``DistributedOptimizer.load_state_dict`` with :func:`separate_step_counts` (no TE / Apex)."""
    from megatron.core.optimizer import distrib_optimizer

    optimizer_class = distrib_optimizer.DistributedOptimizer
    if getattr(optimizer_class.load_state_dict, "separate_steps_fix", False) or distrib_optimizer.HAVE_APEX_OR_TE:
        return
    original = optimizer_class.load_state_dict

    def load_state_dict(self, state_dict):
        result = original(self, state_dict)
        separate_step_counts(self.optimizer)
        return result

    load_state_dict.separate_steps_fix = True
    optimizer_class.load_state_dict = load_state_dict


def apply() -> None:
    """Install the fixes."""
    use_shipped_dataset_helpers()
    resume_distributed_optimizer_with_torch_adam()
    resume_distributed_optimizer_step_counts()
