"""Distillation losses on vocab-sharded (tensor-parallel) logits.

    from megatron_qad.distill import DistillationLoss
    loss_fn = DistillationLoss(kind="kl")                  # or "ce", "kl+ce" with alpha
    loss_sum, num_tokens, metrics = loss_fn(student_logits, teacher_logits, labels, loss_mask)

The triple is what megatron.core's pipeline schedules expect from a ``loss_func``. A training step
runs both models, stage by stage, through those schedules::

    from megatron_qad.distill import TeacherStudentStage, distillation_step
    stage = TeacherStudentStage(student, teacher)          # this rank's pipeline stage of each
    reports = distillation_step(stage, batches, num_microbatches=4, micro_batch_size=2,
                                seq_length=4096, loss=loss_fn)
"""

from .losses import KINDS, DistillationLoss, distillation_loss
from .pipeline import chunk_iterators, distillation_step, innermost, prepare_pipeline_config, sum_reports
from .teacher_student import LayoutMismatchError, TeacherStudentStage, check_same_layout, stage_layout
from .vocab_parallel import (DEFAULT_CHUNK_TOKENS, vocab_parallel_argmax, vocab_parallel_cross_entropy,
                             vocab_parallel_kl)

__all__ = ["KINDS", "DistillationLoss", "distillation_loss", "DEFAULT_CHUNK_TOKENS",
           "vocab_parallel_argmax", "vocab_parallel_cross_entropy", "vocab_parallel_kl",
           "chunk_iterators", "distillation_step", "innermost", "prepare_pipeline_config", "sum_reports",
           "LayoutMismatchError",
           "TeacherStudentStage", "check_same_layout", "stage_layout"]
