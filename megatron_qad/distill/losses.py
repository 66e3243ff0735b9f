"""The distillation loss, shaped as a megatron.core ``loss_func``.

megatron.core 0.19's ``forward_step_calc_loss`` (pipeline_parallel/schedules.py) accepts a loss
function returning three values::

    outputs = loss_func(output_tensor)
    if len(outputs) == 3:
        output_tensor, num_tokens, loss_reduced = outputs
        if not config.calculate_per_token_loss:
            output_tensor /= torch.clamp(num_tokens, min=1)
            output_tensor /= num_microbatches

and with ``calculate_per_token_loss`` it instead sums ``num_tokens`` over the micro-batches and hands
the total to ``finalize_model_grads``, which divides the DP-reduced gradients by the global token
count. :class:`DistillationLoss` returns exactly that triple: the loss *summed* over this rank's
non-masked tokens, their number (int), and a dict of 2-element ``[sum, count]`` tensors, the
reporting format of Megatron-LM's ``pretrain_gpt.loss_func`` (``{'lm loss': cat([loss, num_tokens])}``)
that the training loop sums over micro-batches, all-reduces over DP and divides, so each metric is a
token average over the whole global batch.
"""

from dataclasses import dataclass

import torch
from torch.profiler import record_function

from ..profiling import LOSS
from .vocab_parallel import (DEFAULT_CHUNK_TOKENS, check_chunk_tokens, check_temperature,
                             check_token_shape, resolve_tp_group, vocab_parallel_argmax,
                             vocab_parallel_cross_entropy, vocab_parallel_kl)

KINDS = ("kl", "ce", "kl+ce")


@dataclass
class DistillationLoss:
    """Loss of a student against a frozen teacher (and/or the labels), on vocab-sharded logits.

    kind: "kl" (KL(p_teacher || p_student), the QAD loss), "ce" (cross entropy on the labels, the
    QAT baseline; the teacher is then optional and used only for metrics), or "kl+ce" (``alpha * KL
    + (1 - alpha) * CE``). alpha: in [0, 1], used by "kl+ce" only. temperature: > 0, applies to the
    KL (which is scaled by T^2), not to the CE. tp_group: None for megatron.core's TP group.
    metrics: compute the reporting metrics (no gradient, a few extra collectives).

    Call with ``(student_logits, teacher_logits, labels, loss_mask)``: logits ``[..., V/TP]``
    (megatron.core's ``[s, b, V/TP]``), labels and loss_mask ``logits.shape[:-1]`` (transpose
    Megatron's ``[b, s]`` batches). Tokens where loss_mask is zero are excluded from the loss and
    every metric; None counts every token. Returns ``(loss_sum, num_tokens, metrics)``, see the
    module docstring; metric keys: "loss", "kl", "student ce", "teacher ce", "top1 agreement"
    (fraction of tokens whose student and teacher argmax agree), those that the inputs allow.
    "kl" is the KL term as in the loss (at ``temperature``, T^2-scaled).
    """

    kind: str = "kl"
    alpha: float = 1.0
    temperature: float = 1.0
    tp_group: object = None
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    metrics: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown distillation loss kind {self.kind!r}; expected one of "
                             f"{', '.join(repr(kind) for kind in KINDS)}")
        alpha = float(self.alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (loss = alpha * KL + (1 - alpha) * CE), got "
                             f"{self.alpha!r}")
        self.alpha = alpha
        self.temperature = check_temperature(self.temperature)
        self.chunk_tokens = check_chunk_tokens(self.chunk_tokens)

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None):
        with record_function(LOSS):
            return self._loss(student_logits, teacher_logits, labels, loss_mask)

    def _loss(self, student_logits, teacher_logits, labels, loss_mask):
        needs_kl, needs_ce = self.kind != "ce", self.kind != "kl"
        if needs_kl and teacher_logits is None:
            raise ValueError(f"loss kind {self.kind!r} needs teacher_logits")
        if needs_ce and labels is None:
            raise ValueError(f"loss kind {self.kind!r} needs labels")
        if labels is not None:
            check_token_shape("labels", labels, student_logits)
        if loss_mask is not None:
            check_token_shape("loss_mask", loss_mask, student_logits)
        group = resolve_tp_group(self.tp_group)
        mask = (torch.ones(student_logits.shape[:-1], dtype=torch.bool, device=student_logits.device)
                if loss_mask is None else loss_mask.to(device=student_logits.device) != 0)
        num_tokens = mask.sum().to(torch.int)
        count = num_tokens.float()

        def masked_sum(per_token):
            return torch.where(mask, per_token, per_token.new_zeros(())).sum()

        kl = ce = None
        if needs_kl:
            kl = vocab_parallel_kl(student_logits, teacher_logits, mask, self.temperature, group,
                                   self.chunk_tokens)
        if needs_ce:
            ce = vocab_parallel_cross_entropy(student_logits, labels, group, self.chunk_tokens)
        if self.kind == "kl":
            per_token = kl
        elif self.kind == "ce":
            per_token = ce
        else:
            per_token = self.alpha * kl + (1.0 - self.alpha) * ce
        loss = masked_sum(per_token)

        def report(total):
            return torch.stack([total.detach().float(), count])

        metrics = {"loss": report(loss)}
        if self.metrics:
            with torch.no_grad():
                if teacher_logits is not None:
                    if kl is None:
                        kl = vocab_parallel_kl(student_logits.detach(), teacher_logits, mask,
                                               self.temperature, group, self.chunk_tokens)
                    metrics["kl"] = report(masked_sum(kl))
                if labels is not None:
                    if ce is None:
                        ce = vocab_parallel_cross_entropy(student_logits.detach(), labels, group,
                                                          self.chunk_tokens)
                    metrics["student ce"] = report(masked_sum(ce))
                    if teacher_logits is not None:
                        teacher_ce = vocab_parallel_cross_entropy(teacher_logits.detach(), labels, group,
                                                                  self.chunk_tokens)
                        metrics["teacher ce"] = report(masked_sum(teacher_ce))
                if teacher_logits is not None:
                    student_top1, teacher_top1 = vocab_parallel_argmax(
                        student_logits.detach(), teacher_logits.detach(), tp_group=group)
                    metrics["top1 agreement"] = report(masked_sum((student_top1 == teacher_top1).float()))
        return loss, num_tokens, metrics


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                      labels: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None, *,
                      kind: str = "kl", alpha: float = 1.0, temperature: float = 1.0, tp_group=None,
                      chunk_tokens: int = DEFAULT_CHUNK_TOKENS, metrics: bool = True):
    """One-call form of :class:`DistillationLoss`: ``(loss_sum, num_tokens, metrics)``."""
    return DistillationLoss(kind=kind, alpha=alpha, temperature=temperature, tp_group=tp_group,
                            chunk_tokens=chunk_tokens, metrics=metrics)(
        student_logits, teacher_logits, labels, loss_mask)
