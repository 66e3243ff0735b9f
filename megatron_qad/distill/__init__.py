"""Distillation losses on vocab-sharded (tensor-parallel) logits.

    from megatron_qad.distill import DistillationLoss
    loss_fn = DistillationLoss(kind="kl")                  # or "ce", "kl+ce" with alpha
    loss_sum, num_tokens, metrics = loss_fn(student_logits, teacher_logits, labels, loss_mask)

The triple is what megatron.core's pipeline schedules expect from a ``loss_func``.
"""

from .losses import KINDS, DistillationLoss, distillation_loss
from .vocab_parallel import (DEFAULT_CHUNK_TOKENS, vocab_parallel_argmax, vocab_parallel_cross_entropy,
                             vocab_parallel_kl)

__all__ = ["KINDS", "DistillationLoss", "distillation_loss", "DEFAULT_CHUNK_TOKENS",
           "vocab_parallel_argmax", "vocab_parallel_cross_entropy", "vocab_parallel_kl"]
