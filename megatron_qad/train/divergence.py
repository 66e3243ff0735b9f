"""The divergence policy: a training step whose loss or gradient is not finite is never applied;
the run stops there, or skips the step a bounded number of times in a row.

Settings: ``training.on_nonfinite`` ("stop" or "skip"), ``training.max_skipped_steps`` and
``training.max_loss_spike`` of a recipe, ``--qad-on-nonfinite`` / ``--qad-max-skipped-steps`` /
``--qad-max-loss-spike`` on a Megatron-LM command line (see
:class:`megatron_qad.config.TrainingConfig`). A step is non-finite when a training micro-batch's
loss is NaN or Inf on any rank, or the step's gradients hold a NaN or Inf or their squared L2
norm overflows FP32 (what makes megatron.core's gradient norm Inf).

A diverging run's weights can blow up long before anything is non-finite: with LR 1e6 the first
step takes |w| from 5 to 2e5 and only the third step's loss is NaN, so the newest checkpoint before
it holds ruined, finite weights. With ``max_loss_spike`` set, a step whose loss (per token, over
the global batch) exceeds that factor times the median of the last :data:`SPIKE_WINDOW` applied
steps' losses in this job is handled as a non-finite one (skipped or stopping the run), and a
stop names as the last good checkpoint the newest one whose weights then gave a step that passed
every check: the loss of step ``k`` is computed from the weights of checkpoint ``k - 1``.
Megatron's own spiky-loss check (its rerun state machine's ``is_unexpectedly_large``) flags a
loss only after 100 earlier ones and then lets a reproducible one through, so it would not stop
such a run. The first step of a job has no median and is only checked for finiteness.

How a step is kept from the weights, with every optimizer megatron.core builds (the FP32
optimizer of CPU runs, the BF16 mixed-precision and the distributed optimizer; the training loop
always holds them in a ``ChainedOptimizer``):

1. the forward step hands every training micro-batch's loss and token count to
   :meth:`DivergenceGuard.add_loss` (on the last pipeline stage; counted on the device, no host sync);
2. :meth:`DivergenceGuard.finalize_model_grads` is the model config's ``finalize_model_grads_func``
   (megatron.training keeps a hook that the model builder installed). After megatron.core's
   ``finalize_model_grads`` (data-parallel reduction, per-token scaling) it all-reduces, over all
   ranks, the counts of NaN and Inf losses, the losses' sum and token count and the squared
   gradient norms of every rank: each
   rank reaches the same verdict, for a loss on one data-parallel rank or a gradient on one
   pipeline stage alike;
3. a step to skip is dropped by megatron.core's own check, ``ChainedOptimizer.step``'s
   ``grad_norm_skip_threshold``, which :func:`configure_megatron` sets to the largest FP32 number
   (only an infinite norm exceeds it): the guard sets the step's gradients to +Inf, the optimizer's
   norm is Inf, and the step returns unsuccessful before the inner Adam step, so the weights, the
   Adam moments and step count stay as they were; megatron.training then logs a skipped
   iteration and does not advance the LR schedule. Without the guard a NaN gradient would be
   applied: a NaN norm fails every comparison, and the FP32 optimizer checks for none (the
   mixed-precision ones only with a loss scale);
4. to stop, the guard raises :class:`NonFiniteStep` at the same point on every rank, before the
   optimizer step; :func:`megatron_qad.train.megatron.run_pretrain` prints the one-line reason and
   returns :data:`EXIT_CODE`.

Megatron's own NaN checks (``--check-for-nan-in-loss-and-grad``, on by default) are turned off
by :func:`configure_megatron`: they hand a NaN loss or gradient to the rerun state machine, which
would end the run before a skip could happen (exit 16 or 17), and which leaves the first
iteration of every job unchecked.

Not held back on a skipped step: a MoE router's expert bias (``model.moe_router_bias_update_rate``
> 0; 0 by default), which megatron.core's ``finalize_model_grads`` moves by the rate from the
step's token counts before any check (as on Megatron's own skipped iterations).
"""

from __future__ import annotations

import math
import os
import statistics
from collections import deque

import torch
import torch.distributed as dist
from megatron.core.rerun_state_machine import EXIT_CODE_FAILED_ON_RESULT_VALIDATION

from ..checkpoint_tracker import saved_iteration
from ..config import ConfigError

EXIT_CODE = EXIT_CODE_FAILED_ON_RESULT_VALIDATION
"""The exit code of a run the policy stopped: megatron.core's for a run that failed the validation
of its results (17)."""


SPIKE_WINDOW = 20
"""The applied steps whose median loss the spike bound (``training.max_loss_spike``) is relative to."""


class NonFiniteStep(Exception):
    """Raised on every rank, before the optimizer step, when the policy stops the run at
    ``iteration`` (1-based, Megatron's count); ``value`` says what was not finite ("loss NaN",
    "gradient norm Inf", ...) or spiked, ``skipped`` the iterations skipped right before it."""

    def __init__(self, iteration: int, value: str, skipped: list[int]):
        super().__init__(f"iteration {iteration}: {value}")
        self.iteration, self.value, self.skipped = iteration, value, skipped


def configure_megatron(args) -> None:
    """Set Megatron's arguments the guard relies on (see the module docstring): its own NaN checks
    off, and a gradient-norm skip threshold that only an infinite norm exceeds."""
    args.check_for_nan_in_loss_and_grad = False
    args.grad_norm_skip_threshold = float(torch.finfo(torch.float32).max)


class DivergenceGuard:
    """One run's divergence policy on this rank. ``policy``: "stop", or "skip", where up to
    ``max_skipped_steps`` non-finite steps in a row are skipped and the next one stops the run.
    ``max_loss_spike``: the spike bound (None: none; see the module docstring). ``device``: this
    rank's; ``rank0``: whether this rank prints a line per skipped step. ``skipped`` lists the
    iterations skipped so far (1-based, Megatron's count); ``vetted`` is the newest iteration whose
    weights gave a step that passed every check (None before one did)."""

    def __init__(self, policy: str, max_skipped_steps: int, device: torch.device, rank0: bool,
                 max_loss_spike: float | None = None):
        if max_skipped_steps < 0:
            raise ConfigError(f"--qad-max-skipped-steps (training.max_skipped_steps) must be >= 0, got "
                              f"{max_skipped_steps}")
        if max_loss_spike is not None and not max_loss_spike > 1:
            raise ConfigError(f"--qad-max-loss-spike (training.max_loss_spike) must be > 1 or unset, got "
                              f"{max_loss_spike}")
        self.policy, self.max_skipped_steps, self.rank0 = policy, max_skipped_steps, rank0
        self.max_loss_spike = max_loss_spike
        self.skipped: list[int] = []
        self.in_a_row = 0
        self.vetted: int | None = None
        self._recent = deque(maxlen=SPIKE_WINDOW)  # the losses of the last applied steps
        # this step's NaN and Inf micro-batch losses, the sum of its losses and their token count
        self._losses = torch.zeros(4, device=device)
        self._counted = None  # the last non-finite iteration counted (a re-run step counts once)

    def add_loss(self, loss: torch.Tensor, num_tokens: torch.Tensor) -> None:
        """Count a training micro-batch's loss (megatron.core's per-token contract: the sum over
        ``num_tokens`` tokens) if it is NaN or Inf, and add it to the step's (on the device)."""
        self._losses += torch.stack((loss.isnan().any(), loss.isinf().any(), loss.detach().sum(),
                                     num_tokens.sum())).float()

    def finalize_model_grads(self, model: list[torch.nn.Module], num_tokens: torch.Tensor | None = None,
                             **kwargs) -> None:
        """megatron.core's ``finalize_model_grads(model, num_tokens, **kwargs)``, then the step's
        verdict: nothing for a finite step; for a non-finite one, the gradients set to +Inf (the
        optimizer skips the step) or :class:`NonFiniteStep` raised (the run stops)."""
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.rerun_state_machine import get_rerun_state_machine

        finalize_model_grads(model, num_tokens, **kwargs)
        # Megatron's DistributedDataParallel keeps each trainable parameter's gradient in main_grad.
        grads = [getattr(param, "main_grad", param.grad) for chunk in model for param in chunk.parameters()
                 if param.requires_grad]
        grad_square = torch.stack(torch._foreach_norm(grads)).float().square().sum()
        stats = torch.cat((self._losses, grad_square.reshape(1)))
        dist.all_reduce(stats)
        self._losses.zero_()
        nan_losses, inf_losses, loss_sum, tokens, grad_square = stats.tolist()
        iteration = get_rerun_state_machine().current_iteration
        if nan_losses or inf_losses:
            value = _describe(nan_losses, inf_losses, grad_square)
        else:  # a finite loss that spiked is named before the gradient norm it overflowed
            value = self._spike(loss_sum / tokens) if tokens else None
            if value is None and not math.isfinite(grad_square):
                value = _describe(nan_losses, inf_losses, grad_square)
        if value is None:
            self.in_a_row = 0
            if tokens and iteration != self.vetted_by:  # a re-run step counts once
                self._recent.append(loss_sum / tokens)
            self.vetted = iteration - 1
            return
        if iteration != self._counted:  # the rerun state machine may run a step twice
            self._counted = iteration
            self.in_a_row += 1
            if self.policy == "skip" and self.in_a_row <= self.max_skipped_steps:
                self.skipped.append(iteration)
                if self.rank0:
                    print(f"iteration {iteration}: {value}; step skipped ({self.in_a_row} in a row, at most "
                          f"{self.max_skipped_steps}: training.max_skipped_steps)", flush=True)
        if self.policy == "stop" or self.in_a_row > self.max_skipped_steps:
            raise NonFiniteStep(iteration, value, self.skipped[len(self.skipped) - self.in_a_row + 1:])
        for grad in grads:
            grad.fill_(math.inf)

    @property
    def vetted_by(self) -> int | None:
        """The iteration whose step vetted the weights of :attr:`vetted`."""
        return None if self.vetted is None else self.vetted + 1

    def _spike(self, loss: float) -> str | None:
        """What spiked, when the step's ``loss`` exceeds the bound; None otherwise (or unbounded)."""
        if self.max_loss_spike is None or not self._recent:
            return None
        median = statistics.median(self._recent)
        if not loss > self.max_loss_spike * median:
            return None
        return (f"loss {loss:.4g}, {loss / median:.3g} times the median {median:.4g} of the last {len(self._recent)} "
                f"steps (more than training.max_loss_spike={self.max_loss_spike:g}, --qad-max-loss-spike)")

    def last_good_checkpoint(self, save: str | None) -> str | None:
        """With the spike bound, the phrase naming the newest checkpoint in ``save`` whose weights
        gave a step that passed every check (the newer ones' gave the divergence); None without the
        bound or ``save``."""
        if self.max_loss_spike is None or not save:
            return None
        saved = saved_iteration(save)
        if saved is None:
            return f"no checkpoint was saved in {save} yet"
        good = [iteration for iteration in _iterations(save)
                if self.vetted is not None and iteration <= min(self.vetted, saved)]
        if not good:
            return (f"no checkpoint in {save} was taken before the divergence (iteration {saved}'s weights are "
                    f"those that diverged): start again in an empty checkpoint.save / --save")
        last = max(good)
        if saved == last + 1:
            newer = f"; iteration {saved}'s weights are those that diverged"
        else:
            newer = f"; iterations {last + 1}-{saved} hold the weights that diverged" if saved > last else ""
        return f"the last good checkpoint is iteration {last} in {save}{newer}"


def _iterations(save: str) -> list[int]:
    """The iterations of the ``iter_NNNNNNN`` directories in ``save``."""
    return [int(name[5:]) for name in os.listdir(save) if name.startswith("iter_") and name[5:].isdigit()]


def _describe(nan_losses: float, inf_losses: float, grad_square: float) -> str:
    """What was not finite: the loss (NaN, Inf, or both in different micro-batches), else the
    gradient norm."""
    if nan_losses or inf_losses:
        return "loss " + " and ".join(kind for kind, count in (("NaN", nan_losses), ("Inf", inf_losses)) if count)
    return "gradient norm " + ("NaN" if math.isnan(grad_square) else "Inf")
