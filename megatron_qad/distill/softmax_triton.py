"""Fused Triton kernels for the vocab-sharded losses on CUDA: one read of each logits tensor.

The torch path of :mod:`.vocab_parallel` moves every ``[tokens, V/TP]`` chunk through fp32
temporaries a dozen times (cast, scale, max, exp, sums, and again in the backward). These kernels
read each bf16 / fp32 logit once per pass and keep the arithmetic in registers:

* :func:`local_statistics`: per token and over this rank's vocabulary shard, an online softmax
  (running maximum, sum of exponentials rescaled whenever the maximum grows) of the student and,
  optionally, of the teacher, plus the teacher-weighted log-ratio sum. fp32 ``[tokens, 2]`` or
  ``[tokens, 5]``, the layout :mod:`.vocab_parallel` combines over tensor-parallel ranks.
* :func:`kl_gradient` / :func:`cross_entropy_gradient`: the logits' gradient
  ``g * T * (p_s - p_t)`` or ``g * (p_s - onehot(label))``, recomputed from the logits and the
  log partition functions, written in the logits' dtype.

Arithmetic is fp32. Results equal the torch path up to fp32 rounding (the sums run in another
order), which the GPU tests bound.
"""

import torch
import triton
import triton.language as tl

_STATISTICS_BLOCK = 4096  # vocabulary entries per loop iteration of one token's program
_STATISTICS_WARPS = 8
_GRADIENT_BLOCK = 4096  # vocabulary entries per program of the gradient kernels
_GRADIENT_WARPS = 8
_LOWEST = tl.constexpr(-3.4028234663852886e38)  # the running maxima's start: exp(start - x) == 0


@triton.jit
def _statistics_kernel(student_ptr, teacher_ptr, out_ptr, vocab, student_stride, teacher_stride,
                       inv_temperature, HAS_TEACHER: tl.constexpr, BLOCK: tl.constexpr):
    """One token per program: its row's online-softmax statistics over ``vocab`` entries."""
    row = tl.program_id(0).to(tl.int64)
    columns = tl.arange(0, BLOCK)
    zero = tl.sum(tl.zeros([BLOCK], dtype=tl.float32), axis=0)
    max_s, sum_s = zero + _LOWEST, zero
    max_t, sum_t, cross = zero + _LOWEST, zero, zero
    for start in tl.range(0, vocab, BLOCK):
        offsets = start + columns
        in_vocab = offsets < vocab
        x_s = tl.load(student_ptr + row * student_stride + offsets, mask=in_vocab,
                      other=float("-inf")).to(tl.float32) * inv_temperature
        new_max_s = tl.maximum(max_s, tl.max(x_s, axis=0))
        sum_s = sum_s * tl.exp(max_s - new_max_s) + tl.sum(tl.exp(x_s - new_max_s), axis=0)
        max_s = new_max_s
        if HAS_TEACHER:
            x_t = tl.load(teacher_ptr + row * teacher_stride + offsets, mask=in_vocab,
                          other=float("-inf")).to(tl.float32) * inv_temperature
            new_max_t = tl.maximum(max_t, tl.max(x_t, axis=0))
            rescale = tl.exp(max_t - new_max_t)
            exp_t = tl.exp(x_t - new_max_t)
            sum_t = sum_t * rescale + tl.sum(exp_t, axis=0)
            cross = cross * rescale + tl.sum(tl.where(in_vocab, exp_t * (x_t - x_s), 0.0), axis=0)
            max_t = new_max_t
    if HAS_TEACHER:
        tl.store(out_ptr + row * 5 + 0, max_s)
        tl.store(out_ptr + row * 5 + 1, max_t)
        tl.store(out_ptr + row * 5 + 2, sum_s)
        tl.store(out_ptr + row * 5 + 3, sum_t)
        tl.store(out_ptr + row * 5 + 4, cross)
    else:
        tl.store(out_ptr + row * 2 + 0, max_s)
        tl.store(out_ptr + row * 2 + 1, sum_s)


@triton.jit
def _gradient_kernel(student_ptr, teacher_ptr, labels_ptr, log_z_ptr, grad_loss_ptr, out_ptr, vocab,
                     student_stride, teacher_stride, out_stride, inv_temperature, grad_scale,
                     KL: tl.constexpr, BLOCK: tl.constexpr):
    """Program (token, block of the vocabulary): ``grad_scale * g * (p_s - p_t or onehot)``."""
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = offsets < vocab
    g = tl.load(grad_loss_ptr + row).to(tl.float32) * grad_scale
    x_s = tl.load(student_ptr + row * student_stride + offsets, mask=in_vocab, other=0.0).to(tl.float32)
    if KL:
        p_s = tl.exp(x_s * inv_temperature - tl.load(log_z_ptr + row * 2))
        x_t = tl.load(teacher_ptr + row * teacher_stride + offsets, mask=in_vocab, other=0.0).to(tl.float32)
        target = tl.exp(x_t * inv_temperature - tl.load(log_z_ptr + row * 2 + 1))
    else:
        p_s = tl.exp(x_s - tl.load(log_z_ptr + row))
        target = (offsets == tl.load(labels_ptr + row)).to(tl.float32)  # label -1: not on this shard
    grad = (p_s - target) * g
    tl.store(out_ptr + row * out_stride + offsets, grad.to(out_ptr.dtype.element_ty), mask=in_vocab)


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as [tokens, V] with unit stride along V (a copy only if it has none)."""
    rows = tensor.reshape(-1, tensor.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def local_statistics(student: torch.Tensor, teacher: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """Online-softmax statistics of each token over this rank's shard, fp32.

    student, teacher: CUDA ``[tokens, V/TP]`` (any float dtype, unit stride along V); teacher None
    for the cross entropy. With ``x = z / T``, the maxima first, then the sums: without a teacher
    ``(max x_s, sum exp(x_s - max x_s))``, ``[tokens, 2]``; with one ``(max x_s, max x_t,
    sum exp(x_s - max x_s), sum exp(x_t - max x_t), sum exp(x_t - max x_t) (x_t - x_s))``,
    ``[tokens, 5]``.
    """
    student = _rows(student)
    teacher = None if teacher is None else _rows(teacher)
    tokens, vocab = student.shape
    out = torch.empty(tokens, 2 if teacher is None else 5, dtype=torch.float32, device=student.device)
    if tokens:
        _statistics_kernel[(tokens,)](
            student, student if teacher is None else teacher, out, vocab, student.stride(0),
            student.stride(0) if teacher is None else teacher.stride(0), 1.0 / temperature,
            HAS_TEACHER=teacher is not None, BLOCK=_STATISTICS_BLOCK, num_warps=_STATISTICS_WARPS)
    return out


def kl_gradient(student: torch.Tensor, teacher: torch.Tensor, log_z: torch.Tensor, grad_kl: torch.Tensor,
                temperature: float) -> torch.Tensor:
    """``grad_kl * T * (softmax(z_s / T) - softmax(z_t / T))`` in the student's dtype, ``[tokens, V/TP]``.

    log_z: fp32 ``[tokens, 2]``, the global log partition functions of ``z_s / T`` and ``z_t / T``;
    grad_kl: ``[tokens]``, the gradient of each token's (T^2-scaled) KL.
    """
    student, teacher = _rows(student), _rows(teacher)
    out = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    _launch_gradient(student, teacher, None, log_z.contiguous(), grad_kl, out, 1.0 / temperature,
                     temperature, kl=True)
    return out


def cross_entropy_gradient(logits: torch.Tensor, log_z: torch.Tensor, local_labels: torch.Tensor,
                           grad_loss: torch.Tensor) -> torch.Tensor:
    """``grad_loss * (softmax(z) - onehot(label))`` in the logits' dtype, ``[tokens, V/TP]``.

    log_z: fp32 ``[tokens]``; local_labels: int64 ``[tokens]``, the label's index in this shard or -1
    where the label is on another rank's shard.
    """
    logits = _rows(logits)
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _launch_gradient(logits, logits, local_labels.contiguous(), log_z.contiguous(), grad_loss, out, 1.0, 1.0,
                     kl=False)
    return out


def _launch_gradient(student, teacher, labels, log_z, grad_loss, out, inv_temperature, grad_scale, kl):
    tokens, vocab = student.shape
    if tokens == 0:
        return
    grid = (tokens, triton.cdiv(vocab, _GRADIENT_BLOCK))
    _gradient_kernel[grid](student, teacher, log_z if labels is None else labels, log_z,
                           grad_loss.reshape(-1).contiguous(), out, vocab, student.stride(0), teacher.stride(0),
                           out.stride(0), inv_temperature, grad_scale, KL=kl, BLOCK=_GRADIENT_BLOCK,
                           num_warps=_GRADIENT_WARPS)
