"""How closely a student's next-token distributions follow its teacher's, from full-vocabulary logits.

Per token ``t`` with ``loss_mask[t] = 1``: ``KL(p_teacher || p_student)`` at temperature 1 in nats,
each model's cross entropy on ``labels[t]`` in nats, and whether the two argmaxes agree. Sums are
returned so batches can be added before averaging (:func:`averages`).
"""

import torch

METRICS = ("kl", "student ce", "teacher ce", "top1 agreement")


CHUNK_ELEMENTS = 2**27
"""The most logits (per model) :func:`token_sums` turns into float32 at once: 512 MiB a copy, so a
batch of any size costs a few GiB beyond its logits (a 49k vocabulary at 64 x 1024 tokens would
take tens of GiB in whole-batch float32 copies)."""


def token_sums(teacher_logits: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor,
               loss_mask: torch.Tensor) -> dict[str, float]:
    """Sums over the unmasked tokens of one batch, and their count (``tokens``).

    ``teacher_logits`` / ``student_logits``: float ``[b, s, V]`` (computed in float32, a few
    tokens of one sequence at a time: :data:`CHUNK_ELEMENTS`); ``labels``: int64 ``[b, s]``; ``loss_mask``:
    ``[b, s]``, 1 for tokens that count, 0 otherwise.
    """
    if (teacher_logits.shape != student_logits.shape or teacher_logits.shape[:2] != labels.shape
            or loss_mask.shape != labels.shape):
        raise ValueError(f"logits {tuple(teacher_logits.shape)} / {tuple(student_logits.shape)}, labels "
                         f"{tuple(labels.shape)} and loss mask {tuple(loss_mask.shape)} must be [b, s, V], "
                         f"[b, s] and [b, s]")
    sums = dict.fromkeys([*METRICS, "tokens"], 0.0)
    positions = max(1, CHUNK_ELEMENTS // max(1, teacher_logits.shape[-1]))  # per chunk, within one sequence
    for row in range(labels.shape[0]):  # views of the logits, whatever their strides (no copy of the batch)
        for first in range(0, labels.shape[1], positions):
            chunk = (row, slice(first, first + positions))
            for name, value in _chunk_sums(teacher_logits[chunk], student_logits[chunk], labels[chunk],
                                           loss_mask[chunk]).items():
                sums[name] += value
    return sums


def _chunk_sums(teacher_logits: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor,
                loss_mask: torch.Tensor) -> dict[str, float]:
    """:func:`token_sums` of ``[n, V]`` logits, ``[n]`` labels and mask."""
    teacher = torch.log_softmax(teacher_logits.float(), dim=-1)
    student = torch.log_softmax(student_logits.float(), dim=-1)
    mask = loss_mask.to(teacher.device, torch.float32)
    labels = labels.to(teacher.device)[..., None]
    per_token = {
        "kl": (teacher.exp() * (teacher - student)).sum(dim=-1),
        "student ce": -student.gather(-1, labels)[..., 0],
        "teacher ce": -teacher.gather(-1, labels)[..., 0],
        "top1 agreement": (teacher.argmax(dim=-1) == student.argmax(dim=-1)).float(),
    }
    sums = {name: float((values * mask).sum()) for name, values in per_token.items()}
    sums["tokens"] = float(mask.sum())
    return sums


def averages(batch_sums: list[dict[str, float]]) -> dict[str, float]:
    """Per-token means of :data:`METRICS` over the batches' :func:`token_sums`."""
    tokens = sum(sums["tokens"] for sums in batch_sums)
    if tokens == 0:
        raise ValueError("no unmasked token to average over")
    return {name: sum(sums[name] for sums in batch_sums) / tokens for name in METRICS}
