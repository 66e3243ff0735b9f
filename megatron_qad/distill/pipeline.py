"""One distillation step (forward and backward of every micro-batch) through megatron.core's schedules.

:func:`distillation_step` runs :class:`~megatron_qad.distill.teacher_student.TeacherStudentStage`
models through ``megatron.core.pipeline_parallel.get_forward_backward_func()``: no pipelining,
1F1B, or interleaved (a list of chunks), whichever megatron.core's parallel state selects. The
schedule is told a micro-batch size of ``2 * micro_batch_size``, so its p2p tensor shape
``[s, 2b, h]`` carries the student's and the teacher's activations (see the wrapper's docstring).

Data contract: ``data_iterator`` (one per model chunk for the interleaved schedule) yields, on every
pipeline stage, one dict per micro-batch; every stage draws ``num_microbatches`` of them, in the
same order, and they must be the same micro-batches on the stages of one pipeline:

  ``tokens``        int64 [b, s] (b = micro_batch_size, s = seq_length): the input ids. Only the
                    first stage embeds them; the others use their shape only.
  ``loss_mask``     optional, [b, s] (bool or float, nonzero = counts): tokens in the loss and the
                    metrics; read on the last stage. Absent: every token counts.
  ``labels``        optional, int64 [b, s]: next-token labels, needed by the "ce" and "kl+ce" losses
                    and for the CE metrics; read on the last stage.
  ``position_ids``  optional, int64 [b, s]: default ``arange(s)`` per row (RoPE runs on every stage).

Tensors are moved to the device of the student's parameters. The attention mask is causal
(:func:`megatron_qad.models.causal_attention_mask`).

Loss scaling: ``config.calculate_per_token_loss`` is set, so the schedule back-propagates each
micro-batch's summed loss unscaled and passes the total token count (over micro-batches) to
``config.finalize_model_grads_func``; megatron.core's ``finalize_model_grads`` all-reduces it over
data parallelism and divides the gradients by it (the KL averaged over all non-masked tokens of
the global batch, DESIGN.md section 4). Without a finalize function (None, e.g. no DDP), the
student's gradients are those of the summed loss: divide by the token count yourself.
"""

import functools
from collections.abc import Iterator, Sequence

import torch

from .losses import DistillationLoss
from .teacher_student import TeacherStudentStage


def prepare_pipeline_config(config, device: torch.device, interleaved: bool = False) -> None:
    """Set the TransformerConfig fields the schedules read for a distillation step (in place).

    Always ``calculate_per_token_loss=True`` (see the module docstring). For the interleaved
    schedule (``interleaved``: virtual pipeline chunks) ``batch_p2p_comm=False`` and
    ``overlap_p2p_comm=True``, Megatron-LM's own defaults there: in its steady state a rank sends an
    activation to the next stage and a gradient to the previous one in one batch, and at PP=2 both
    go to the same peer with the same tag, posted as [send to prev, recv from prev, send to next,
    recv from next] on both ranks; point-to-point messages between two ranks match in posting
    order, so a batch swaps the activation and the gradient (same shape, no error: measured on
    gloo as a KL of 1.3 instead of 0.05 from the third micro-batch on). The unbatched path posts
    even and odd ranks in complementary orders and uses two communicators at PP=2. On the CPU also
    ``batch_p2p_sync=False`` and ``variable_seq_lengths=False``: megatron.core 0.19.2's
    ``p2p_communication._communicate`` calls ``torch.cuda.synchronize()`` after a batched
    ``batch_isend_irecv`` when ``batch_p2p_sync`` is set (the default), and ``_communicate_shapes``
    (used when ``variable_seq_lengths``) does too; gloo needs neither (the sequence length is fixed).
    """
    config.calculate_per_token_loss = True
    if interleaved:
        config.batch_p2p_comm, config.overlap_p2p_comm = False, True
    if device.type == "cpu":
        config.batch_p2p_sync = False
        config.variable_seq_lengths = False


def _loss_func(loss: DistillationLoss, labels, loss_mask, output):
    student_logits, teacher_logits = output if isinstance(output, tuple) else (output, None)
    return loss(student_logits, teacher_logits, labels, loss_mask)


def forward_micro_batch(loss: DistillationLoss, micro_batch_size: int, seq_length: int, device: torch.device,
                        batch: dict, model: torch.nn.Module):
    """One micro-batch ``batch`` (see the module docstring) through this stage's model(s); returns
    megatron.core's ``(output, loss_func)``."""
    from ..models import causal_attention_mask

    tokens = batch["tokens"]
    if tuple(tokens.shape) != (micro_batch_size, seq_length):
        raise ValueError(f"a micro-batch's tokens must be [micro_batch_size, seq_length] = "
                         f"[{micro_batch_size}, {seq_length}], got {list(tokens.shape)}")
    tokens = tokens.to(device)
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(seq_length, device=device).expand(micro_batch_size, -1)
    position_ids = position_ids.to(device)
    labels, loss_mask = batch.get("labels"), batch.get("loss_mask")
    labels = None if labels is None else labels.to(device)
    loss_mask = None if loss_mask is None else loss_mask.to(device)
    output = model(tokens, position_ids, causal_attention_mask(seq_length, device))
    return output, functools.partial(_loss_func, loss, labels, loss_mask)


def _forward_step(loss: DistillationLoss, micro_batch_size: int, seq_length: int, device: torch.device,
                  data_iterator: Iterator, model: torch.nn.Module):
    """megatron.core's ``forward_step_func``: the next micro-batch through this stage's model(s)."""
    return forward_micro_batch(loss, micro_batch_size, seq_length, device, next(data_iterator), model)


def distillation_step(stages: TeacherStudentStage | Sequence[TeacherStudentStage],
                      data_iterator: Iterator | Sequence[Iterator], num_microbatches: int,
                      micro_batch_size: int, seq_length: int, loss: DistillationLoss,
                      forward_only: bool = False) -> list[dict]:
    """Forward (and, unless ``forward_only``, backward) ``num_microbatches`` micro-batches.

    stages: this rank's :class:`TeacherStudentStage`, or its list of virtual-pipeline chunks (one
    data iterator each), each possibly wrapped in megatron.core's ``DistributedDataParallel``
    (then set ``config.finalize_model_grads_func = finalize_model_grads`` to reduce the gradients
    at the end of the step, see the module docstring). Plain models (no teacher) work the same way
    with a ``"ce"`` loss: training from scratch, or QAT without a teacher. data_iterator: see the module docstring. micro_batch_size, seq_length: of
    each micro-batch (``b``, ``s``; not doubled: the teacher's half is added here). loss: called
    on the last stage as ``loss(student_logits, teacher_logits, labels, loss_mask)``, it returns
    ``(loss_sum, num_tokens, metrics)``.

    Gradients accumulate into the student's ``.grad`` (zero them before the step); the teacher gets
    none. Returns the ``metrics`` dicts of the micro-batches (each value a ``[sum, count]`` tensor,
    see :func:`sum_reports`) on the last pipeline stage, an empty list on the others.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    chunks = list(stages) if isinstance(stages, Sequence) else [stages]
    if not chunks or not all(isinstance(chunk, torch.nn.Module) for chunk in chunks):
        raise TypeError(f"stages must be a model chunk or a non-empty list of them, got {type(stages).__name__}")
    inner = [unwrap_stage(chunk) for chunk in chunks]
    with_teacher = inner[0] is not None
    if any((stage is not None) != with_teacher for stage in inner):
        raise TypeError("either every chunk is a TeacherStudentStage or none is")
    if not with_teacher and loss.kind != "ce":
        raise ValueError(f"loss kind {loss.kind!r} needs a teacher: wrap the chunks in TeacherStudentStage, "
                         f"or use DistillationLoss('ce')")
    for name, value in (("num_microbatches", num_microbatches), ("micro_batch_size", micro_batch_size),
                        ("seq_length", seq_length)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    iterators = data_iterator
    if len(chunks) > 1:
        if not isinstance(data_iterator, Sequence) or len(data_iterator) != len(chunks):
            raise ValueError(f"{len(chunks)} model chunks (virtual pipeline) need one data iterator "
                             f"each, as a list of {len(chunks)}")
    device = next(chunks[0].parameters()).device
    for chunk, stage in zip(chunks, inner):
        stage = stage if with_teacher else innermost(chunk)
        if chunk is not stage and not stage.config.calculate_per_token_loss:
            raise ValueError("the student's config has calculate_per_token_loss=False, which "
                             "DistributedDataParallel read when it was built (it then averages "
                             "gradients over data parallelism instead of summing token sums); set "
                             "config.calculate_per_token_loss=True before wrapping the stage")
        prepare_pipeline_config(stage.config, device, interleaved=len(chunks) > 1)
    forward_step = functools.partial(_forward_step, loss, micro_batch_size, seq_length, device)
    forward_backward = get_forward_backward_func()
    # Forward-only passes (calibration, validation) build no autograd graph: megatron.core's
    # schedules do not turn it off, and the graphs of all micro-batches would otherwise stay alive
    # until the last one is done.
    with torch.set_grad_enabled(not forward_only):
        return forward_backward(forward_step_func=forward_step, data_iterator=iterators, model=chunks,
                                num_microbatches=num_microbatches, seq_length=seq_length,
                                micro_batch_size=(2 if with_teacher else 1) * micro_batch_size,
                                forward_only=forward_only)


def chunk_iterators(chunks: Sequence[torch.nn.Module], batches: Sequence[dict]) -> list[Iterator]:
    """``data_iterator`` for :func:`distillation_step`: one iterator over the same ``batches`` per
    model chunk (megatron.core's schedules take a one-element list for a single chunk too)."""
    return [iter(batches) for _ in chunks]


def innermost(model: torch.nn.Module) -> torch.nn.Module:
    """The model under wrappers that keep it as ``.module`` (megatron.core's DDP); a
    :class:`TeacherStudentStage` is innermost (its student is not ``.module``)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def unwrap_stage(model: torch.nn.Module) -> TeacherStudentStage | None:
    """The :class:`TeacherStudentStage` inside ``model`` (itself, or under wrappers that keep the
    wrapped module as ``.module``, like megatron.core's DistributedDataParallel); None if none."""
    model = innermost(model)
    return model if isinstance(model, TeacherStudentStage) else None


def sum_reports(reports: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Sum the per-micro-batch ``{name: [sum, count]}`` metrics into one ``[sum, count]`` per name
    (divide ``sum / count`` for the token average; all-reduce over data parallelism first for a
    global batch)."""
    totals: dict[str, torch.Tensor] = {}
    for report in reports:
        for name, value in report.items():
            totals[name] = totals[name] + value if name in totals else value.clone()
    return totals
