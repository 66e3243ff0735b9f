"""Losses on vocab-sharded logits: KL divergence, cross entropy and argmax, never gathering the vocabulary.

Logits follow megatron.core's layout: this tensor-parallel rank holds the contiguous vocabulary shard
``[rank * V/TP, (rank + 1) * V/TP)`` in the last dimension, ``[s, b, V/TP]`` in a GPTModel (any
leading dimensions are accepted). Each rank computes every token's softmax statistics over its own
shard (local maximum, sum of exponentials relative to it, and the KL's teacher-weighted sum); the
ranks then combine them with one all-reduce MAX of the maxima and one all-reduce SUM of the sums,
each rescaled to the global maximum, so each rank only ever holds ``[tokens, V/TP]``.

Arithmetic is fp32 (fp64 when the logits are fp64), whatever the logits' dtype, and so are the
per-token results. On CUDA, fused Triton kernels (:mod:`.softmax_triton`) read each logits tensor
once per pass; elsewhere torch processes tokens in chunks of ``chunk_tokens``, so the fp32 working
set is a few ``chunk x V/TP`` buffers whatever the batch. The autograd functions save their inputs
in their own dtype (a reference, not a copy: the caller's graph keeps the student logits alive
anyway) plus two fp32 scalars per token (log partition functions), and the backward recomputes the
softmax; it needs no collective.

Each function takes ``tp_group``: None means megatron.core's tensor-model-parallel group when its
parallel state is initialised, else a single rank (no torch.distributed needed).
"""

import torch
import torch.distributed as dist

DEFAULT_CHUNK_TOKENS = 4096


def resolve_tp_group(tp_group):
    """The group to reduce over: ``tp_group`` itself, megatron.core's TP group, or None (one rank)."""
    if tp_group is not None:
        return tp_group
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError("torch.distributed runs several processes but megatron.core's model-parallel "
                           "groups are not initialised: pass tp_group explicitly (or call "
                           "megatron_qad.parallel.initialize first)")
    return None


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if _group_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def check_chunk_tokens(chunk_tokens: int) -> int:
    if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
    return chunk_tokens


def check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not temperature > 0.0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return temperature


def _check_logits(name: str, logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty vocabulary (last) dimension, got shape "
                         f"{tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be floating point (fp32 or bf16), got {logits.dtype}")


def check_token_shape(name: str, tensor: torch.Tensor, logits: torch.Tensor) -> None:
    """Raise ValueError unless ``tensor`` has the logits' token dimensions ``logits.shape[:-1]``."""
    if tuple(tensor.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)} but the logits have shape {tuple(logits.shape)}: "
            f"{name} must have the logits' token dimensions {tuple(logits.shape[:-1])} (megatron.core "
            f"logits are [s, b, V/TP] while its batches hold [b, s]: transpose {name} first)")


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 for fp64 logits (for finite-difference checks)."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _chunks(num_tokens: int, chunk_tokens: int):
    for start in range(0, num_tokens, chunk_tokens):
        yield start, min(start + chunk_tokens, num_tokens)


def _use_triton(logits: torch.Tensor) -> bool:
    """The fused kernels serve CUDA logits; fp64 (finite-difference checks) and CPU use torch."""
    return logits.is_cuda and logits.dtype != torch.float64


def _triton_kernels():
    """:mod:`.softmax_triton`, imported on first GPU use so CPU-only installs never need Triton."""
    from . import softmax_triton
    return softmax_triton


def _local_statistics(student_2d: torch.Tensor, teacher_2d: torch.Tensor | None, temperature: float,
                      chunk_tokens: int) -> torch.Tensor:
    """Each token's softmax statistics over this rank's shard: see ``softmax_triton.local_statistics``
    (the same columns, in the compute dtype), computed with torch chunk by chunk off CUDA."""
    if _use_triton(student_2d):
        return _triton_kernels().local_statistics(student_2d, teacher_2d, temperature)
    dtype = _compute_dtype(student_2d)
    columns = 2 if teacher_2d is None else 5
    stats = torch.empty(student_2d.shape[0], columns, dtype=dtype, device=student_2d.device)
    for start, end in _chunks(student_2d.shape[0], chunk_tokens):
        x_s = student_2d[start:end].to(dtype) / temperature
        max_s = x_s.amax(dim=-1)
        stats[start:end, 0] = max_s
        stats[start:end, columns // 2] = torch.exp(x_s - max_s.unsqueeze(-1)).sum(dim=-1)
        if teacher_2d is not None:
            x_t = teacher_2d[start:end].to(dtype) / temperature
            max_t = x_t.amax(dim=-1)
            exp_t = torch.exp(x_t - max_t.unsqueeze(-1))
            stats[start:end, 1] = max_t
            stats[start:end, 3] = exp_t.sum(dim=-1)
            stats[start:end, 4] = (exp_t * (x_t - x_s)).sum(dim=-1)
            del x_t, exp_t
        del x_s
    return stats


def _combine_over_ranks(maxima: torch.Tensor, sums: torch.Tensor, sum_owner: list[int | None], group):
    """Global maxima and sums from every rank's local ones: ``(global maxima, global sums)``.

    maxima: ``[tokens, M]`` local maxima (not modified; returned as they are on one rank); sums: ``[tokens, S]`` sums of exponentials
    relative to the local maximum of column ``sum_owner[j]``, or sums unrelated to any maximum
    (``sum_owner[j]`` None). One MAX and one SUM all-reduce for all columns together.
    """
    if _group_size(group) == 1:
        return maxima, sums
    global_maxima = _all_reduce(maxima.clone(), dist.ReduceOp.MAX, group)
    rescale = torch.exp(maxima - global_maxima)
    sums = torch.stack([sums[:, j] if owner is None else sums[:, j] * rescale[:, owner]
                        for j, owner in enumerate(sum_owner)], dim=-1)
    _all_reduce(sums, dist.ReduceOp.SUM, group)
    return global_maxima, sums


class _VocabParallelKL(torch.autograd.Function):
    """T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) per token, on vocab shards; grads to z_s only."""

    @staticmethod
    def forward(ctx, student, teacher, temperature, group, chunk_tokens):
        vocab_local = student.shape[-1]
        student_2d = student.reshape(-1, vocab_local)
        teacher_2d = teacher.reshape(-1, vocab_local)
        stats = _local_statistics(student_2d, teacher_2d, temperature, chunk_tokens)
        # sums: exp(x_s - m_s), exp(x_t - m_t), exp(x_t - m_t) (x_t - x_s), not yet normalised
        # Column slices, not index lists: a list index is copied to the GPU, which synchronises.
        maxima, sums = _combine_over_ranks(stats[:, :2], stats[:, 2:], [0, 1, 1], group)
        log_z = maxima + torch.log(sums[:, :2])  # (student, teacher)
        # KL = sum_v p_t (x_t - x_s) - log Z_t + log Z_s
        kl = (sums[:, 2] / sums[:, 1] + log_z[:, 0] - log_z[:, 1]) * (temperature * temperature)
        ctx.save_for_backward(student, teacher, log_z)
        ctx.temperature, ctx.chunk_tokens = temperature, chunk_tokens
        return kl.view(student.shape[:-1])

    @staticmethod
    def backward(ctx, grad_kl):
        student, teacher, log_z = ctx.saved_tensors
        temperature, chunk_tokens = ctx.temperature, ctx.chunk_tokens
        vocab_local = student.shape[-1]
        student_2d = student.reshape(-1, vocab_local)
        teacher_2d = teacher.reshape(-1, vocab_local)
        dtype = log_z.dtype
        grad_2d = grad_kl.reshape(-1).to(dtype)
        if _use_triton(student_2d):
            grad_student = _triton_kernels().kl_gradient(student_2d, teacher_2d, log_z, grad_2d, temperature)
            return grad_student.view(student.shape), None, None, None, None
        grad_student = torch.empty(student_2d.shape, dtype=student.dtype, device=student.device)
        for start, end in _chunks(student_2d.shape[0], chunk_tokens):
            p_s = torch.exp(student_2d[start:end].to(dtype) / temperature - log_z[start:end, 0:1])
            p_t = torch.exp(teacher_2d[start:end].to(dtype) / temperature - log_z[start:end, 1:2])
            p_s.sub_(p_t).mul_(grad_2d[start:end].unsqueeze(-1) * temperature)
            grad_student[start:end] = p_s
        return grad_student.view(student.shape), None, None, None, None


def vocab_parallel_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      loss_mask: torch.Tensor | None = None, temperature: float = 1.0, tp_group=None,
                      chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Per-token KL(p_teacher || p_student) on vocab-sharded logits: fp32, shape ``logits.shape[:-1]``.

    student_logits, teacher_logits: this rank's vocabulary shard ``[..., V/TP]``, fp32 or bf16, the
    same shape (both models must pad the vocabulary alike). With ``x = z / T`` and ``p = softmax(x)``
    over the full vocabulary, the value is ``T^2 * sum_v p_t (log p_t - log p_s)`` (the usual
    distillation scaling, which keeps gradient magnitudes roughly independent of T).

    Gradient (exact, computed locally from the saved logits): ``d KL/d x_s = p_s - p_t``, and
    ``d x_s/d z_s = 1/T``, so ``d (T^2 KL)/d z_s = T (softmax(z_s/T) - softmax(z_t/T))``, times the
    incoming per-token gradient; returned in the student logits' dtype. The teacher logits get no
    gradient (the teacher is frozen).

    loss_mask: optional, shape ``logits.shape[:-1]``; tokens where it is zero/False get KL 0 (and no
    gradient). temperature: > 0. tp_group: see the module
    docstring. chunk_tokens: tokens per chunk of the torch path (CPU); its fp32 working set is a
    few ``chunk_tokens x V/TP`` buffers. The saved state is the two input tensors plus 8 bytes per
    token. Collectives: one MAX and one SUM all-reduce for both models and all tokens together.
    """
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits have shape {tuple(student_logits.shape)} but teacher logits have shape "
            f"{tuple(teacher_logits.shape)}: they must match (a different last dimension usually means "
            f"the two models pad the vocabulary differently, e.g. make_vocab_size_divisible_by)")
    temperature = check_temperature(temperature)
    chunk_tokens = check_chunk_tokens(chunk_tokens)
    if loss_mask is not None:
        check_token_shape("loss_mask", loss_mask, student_logits)
    group = resolve_tp_group(tp_group)
    kl = _VocabParallelKL.apply(student_logits, teacher_logits.detach(), temperature, group, chunk_tokens)
    if loss_mask is not None:
        kl = torch.where(loss_mask.to(device=kl.device) != 0, kl, kl.new_zeros(()))
    return kl


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """-log softmax(z)[label] per token on vocab shards, chunked, with a recomputing backward."""

    @staticmethod
    def forward(ctx, logits, labels, group, chunk_tokens):
        vocab_local = logits.shape[-1]
        logits_2d = logits.reshape(-1, vocab_local)
        vocab_start = _group_rank(group) * vocab_local
        local_labels = labels.reshape(-1).to(device=logits.device, dtype=torch.long) - vocab_start
        on_shard = (local_labels >= 0) & (local_labels < vocab_local)
        local_labels = torch.where(on_shard, local_labels, torch.zeros_like(local_labels))
        dtype = _compute_dtype(logits)
        stats = _local_statistics(logits_2d, None, 1.0, chunk_tokens)
        target = logits_2d.gather(-1, local_labels.unsqueeze(-1)).squeeze(-1).to(dtype)
        target = torch.where(on_shard, target, target.new_zeros(()))
        sums = torch.stack([stats[:, 1], target], dim=-1)
        maximum, sums = _combine_over_ranks(stats[:, :1], sums, [0, None], group)
        log_z = maximum[:, 0] + torch.log(sums[:, 0])
        loss = log_z - sums[:, 1]
        ctx.save_for_backward(logits, local_labels, on_shard, log_z)
        ctx.chunk_tokens = chunk_tokens
        return loss.view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_loss):
        logits, local_labels, on_shard, log_z = ctx.saved_tensors
        vocab_local = logits.shape[-1]
        logits_2d = logits.reshape(-1, vocab_local)
        dtype = log_z.dtype
        grad_2d = grad_loss.reshape(-1).to(dtype)
        if _use_triton(logits_2d):
            labels_here = torch.where(on_shard, local_labels, torch.full_like(local_labels, -1))
            grad_logits = _triton_kernels().cross_entropy_gradient(logits_2d, log_z, labels_here, grad_2d)
            return grad_logits.view(logits.shape), None, None, None
        grad_logits = torch.empty(logits_2d.shape, dtype=logits.dtype, device=logits.device)
        for start, end in _chunks(logits_2d.shape[0], ctx.chunk_tokens):
            softmax = torch.exp(logits_2d[start:end].to(dtype) - log_z[start:end].unsqueeze(-1))
            softmax.scatter_add_(-1, local_labels[start:end].unsqueeze(-1),
                                 -on_shard[start:end].to(dtype).unsqueeze(-1))
            softmax.mul_(grad_2d[start:end].unsqueeze(-1))
            grad_logits[start:end] = softmax
        return grad_logits.view(logits.shape), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, tp_group=None,
                                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Per-token cross entropy ``-log softmax(logits)[label]`` on vocab-sharded logits, fp32.

    Same values and gradient as ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy``
    (without label smoothing), but chunked like :func:`vocab_parallel_kl`, and it never writes into
    its input (megatron.core's subtracts the max in place from fp32 logits, which would corrupt
    logits that the KL also reads). labels: global vocabulary ids, shape ``logits.shape[:-1]``;
    masking is the caller's (ids outside the vocabulary give the loss ``log Z``).
    Gradient: ``softmax(logits) - onehot(label)`` restricted to this shard.
    """
    _check_logits("logits", logits)
    check_token_shape("labels", labels, logits)
    chunk_tokens = check_chunk_tokens(chunk_tokens)
    return _VocabParallelCrossEntropy.apply(logits, labels, resolve_tp_group(tp_group), chunk_tokens)


@torch.no_grad()
def vocab_parallel_argmax(*logits: torch.Tensor, tp_group=None) -> list[torch.Tensor]:
    """Global argmax over the vocabulary of each vocab-sharded logits tensor (int64, ``shape[:-1]``).

    The tensors must have the same shape (e.g. the student's and the teacher's logits).

    Ties resolve to the smallest vocabulary id, as ``torch.argmax`` does on the full vocabulary.
    Collectives: one MAX (of the local maxima) and one MIN (of the candidate ids) for all tensors.
    """
    group = resolve_tp_group(tp_group)
    for index, tensor in enumerate(logits):
        _check_logits(f"logits[{index}]", tensor)
        if tensor.shape != logits[0].shape:
            raise ValueError(f"logits[{index}] has shape {tuple(tensor.shape)} but logits[0] has shape "
                             f"{tuple(logits[0].shape)}: they must match")
    vocab_local = logits[0].shape[-1]
    vocab_start = _group_rank(group) * vocab_local
    flat = [tensor.reshape(-1, tensor.shape[-1]) for tensor in logits]
    local_index = torch.stack([tensor.argmax(dim=-1) for tensor in flat])
    local_max = torch.stack([tensor.gather(-1, idx.unsqueeze(-1)).squeeze(-1).double()
                             for tensor, idx in zip(flat, local_index)])
    global_max = _all_reduce(local_max.clone(), dist.ReduceOp.MAX, group)
    no_candidate = torch.iinfo(torch.long).max
    candidate = torch.where(local_max == global_max, local_index + vocab_start,
                            torch.full_like(local_index, no_candidate))
    _all_reduce(candidate, dist.ReduceOp.MIN, group)
    return [ids.view(tensor.shape[:-1]) for ids, tensor in zip(candidate, logits)]
