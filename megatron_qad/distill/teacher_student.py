"""A pipeline stage holding the student and the frozen teacher, for megatron.core's schedules.

Teacher and student share one layout (DESIGN.md section 4): the same ranks, the same stage
boundaries. :class:`TeacherStudentStage` runs both models' layers of one pipeline stage (or one
virtual-pipeline chunk), and the teacher's activations travel with the student's through the same
point-to-point transfers, joined on the batch dimension::

    p2p tensor  [s, 2b, h] = cat([student hidden [s, b, h], teacher hidden [s, b, h]], dim=1)

The batch dimension is dimension 1 of megatron.core's ``[s, b, h]`` with or without sequence
parallelism (which splits dimension 0), so the schedules' own tensor shape fits once they are told
that the micro-batch size is ``2 * b`` (see :func:`megatron_qad.distill.pipeline.distillation_step`).

The teacher is frozen: its parameters have ``requires_grad=False``, it stays in eval mode, runs
under ``torch.no_grad()``, and its half of every received and sent tensor is detached, so no
gradient reaches it or flows back through its half of the p2p tensor (the backward transfer of
that half carries zeros). The teacher is *not* a registered submodule: ``parameters()``,
``named_parameters()``, ``state_dict()``, ``train()``, ``to()`` and ``zero_grad()`` of the wrapper
see the student only (state-dict keys ``student.*``), so an optimizer or DDP built on the wrapper
never holds teacher parameters. Checkpoints hold the student under its own names:
``sharded_state_dict()`` and ``load_state_dict()`` are the student's (no ``student.`` prefix). Move or cast the teacher through ``stage.teacher`` itself.
"""

import torch
from torch.profiler import record_function

from ..profiling import STUDENT_FORWARD, TEACHER_FORWARD


class LayoutMismatchError(ValueError):
    """Teacher and student stages are not laid out the same way."""


def stage_layout(model: torch.nn.Module) -> dict:
    """What must agree between a teacher and a student stage for them to share the pipeline.

    Keys: ``layers`` (global 0-based indices of this stage's decoder layers: count and stage
    boundaries), ``layer_kinds`` (per layer: its type, MLP type and whether a linear layer stands in
    for its attention, see ``models.DecoderLayer``; a DeciLM teacher and a student built from
    another block file differ here), ``hidden_size``, ``vocab_size`` (the size the model was built with; megatron.core
    pads nothing itself, so equal sizes give equal vocab shards), ``pre_process``, ``post_process``,
    ``vp_stage`` and ``pipeline_dtype`` (the dtype of the p2p buffers both halves share).
    """
    from ..models import decoder_layers  # megatron.core is imported only when stages are built

    config = model.config
    layers = decoder_layers(model)
    return {
        "layers": tuple(layer.index for layer in layers),
        "layer_kinds": tuple((layer.type, layer.mlp_type, layer.attention_linear is not None) for layer in layers),
        "hidden_size": config.hidden_size,
        "vocab_size": getattr(model, "vocab_size", None),
        "pre_process": model.pre_process,
        "post_process": model.post_process,
        "vp_stage": getattr(model, "vp_stage", None),
        "pipeline_dtype": config.pipeline_dtype,
    }


def check_same_layout(student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    """Raise :class:`LayoutMismatchError` naming every field where the two stages differ."""
    student_layout, teacher_layout = stage_layout(student), stage_layout(teacher)
    differences = [f"{key}: student {student_layout[key]!r}, teacher {teacher_layout[key]!r}"
                   for key in student_layout if student_layout[key] != teacher_layout[key]]
    if differences:
        raise LayoutMismatchError(
            "teacher and student must have the same pipeline layout (their activations share the "
            "p2p transfers); they differ in " + "; ".join(differences))


class TeacherStudentStage(torch.nn.Module):
    """One pipeline stage (or virtual chunk) of a student and a frozen teacher, as one model.

    ``student`` and ``teacher``: megatron.core GPT (or hybrid) models of this rank's stage, built
    with identical layouts (checked, see :func:`stage_layout`); the student may be quantized. The
    teacher is frozen here (``requires_grad=False``, eval mode) and is not registered as a
    submodule (see the module docstring): give the optimizer ``stage.parameters()`` or
    ``stage.student.parameters()``.

    The attributes the schedules read (``config``, ``model_type``, ``vp_stage``) are the student's;
    ``pre_process`` / ``post_process`` say whether this is the first / last stage.

    Call protocol (what ``forward_step_func`` does under megatron.core's schedules):
      * ``set_input_tensor(x)``: ``x`` is None on the first stage, else the received
        ``[s, 2b, h]`` tensor (or a one-element list of it) in ``config.pipeline_dtype``; its first
        ``b`` columns go to the student (graph kept, so ``x.grad`` is the gradient sent back), the
        last ``b`` to the teacher, detached.
      * ``forward(input_ids [b, s] int64, position_ids [b, s] int64, attention_mask)``: non-last
        stages return ``[s, 2b, h]`` (a fresh tensor, safe with ``deallocate_pipeline_outputs``);
        the last stage returns ``(student_logits, teacher_logits)``, each ``[b, s, V / TP]``, the
        teacher's without a graph.
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module):
        super().__init__()
        if student is teacher:
            raise ValueError("student and teacher must be two separate models")
        check_same_layout(student, teacher)
        self.student = student
        # Not registered as a submodule: parameters(), state_dict(), train() and to() skip it.
        object.__setattr__(self, "_teacher", teacher)
        for param in teacher.parameters():
            param.requires_grad_(False)
        teacher.eval()
        self.config = student.config
        self.model_type = student.model_type
        self.vp_stage = getattr(student, "vp_stage", None)
        self.pre_process = student.pre_process
        self.post_process = student.post_process

    def __getattr__(self, name: str):
        """Attributes the wrapper lacks are the student's: megatron.core's ``finalize_model_grads``
        finds the module that has ``pre_process`` (this one) and then reads the student's
        ``share_embeddings_and_output_weights`` / ``shared_embedding_or_output_weight()`` /
        ``embedding`` from it, as from a bare model."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "student":  # not assigned yet (inside __init__)
                raise
            return getattr(self.student, name)

    @property
    def teacher(self) -> torch.nn.Module:
        """The frozen teacher stage (not a registered submodule)."""
        return self._teacher

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """The student's sharded state dict (no ``student.`` prefix): a stage's checkpoint is the
        student's, which loads as a plain model (Megatron-LM's ``--load``, the export)."""
        return self.student.sharded_state_dict(prefix, sharded_offsets, metadata)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a state dict of the student's own keys (what :meth:`sharded_state_dict` saved)."""
        return self.student.load_state_dict(state_dict, strict=strict, assign=assign)

    def train(self, mode: bool = True):
        """Set the student's mode; the teacher stays in eval mode."""
        super().train(mode)
        self._teacher.eval()
        return self

    def set_input_tensor(self, input_tensor) -> None:
        """Split the received ``[s, 2b, h]`` tensor: student first half, teacher (detached) second."""
        if isinstance(input_tensor, (list, tuple)):
            if len(input_tensor) != 1:
                raise ValueError(f"expected one input tensor, got {len(input_tensor)}")
            input_tensor = input_tensor[0]
        if input_tensor is None:  # first stage: both models embed the tokens
            self.student.set_input_tensor(None)
            self._teacher.set_input_tensor(None)
            return
        if input_tensor.dim() != 3 or input_tensor.shape[1] % 2:
            raise ValueError(f"expected the joined [s, 2b, h] activations of student and teacher, got "
                             f"shape {tuple(input_tensor.shape)} (dimension 1 must be even)")
        student_half, teacher_half = input_tensor.chunk(2, dim=1)
        self.student.set_input_tensor(student_half.contiguous())
        self._teacher.set_input_tensor(teacher_half.detach().contiguous())

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Teacher (no grad) then student on this stage; see the class docstring for the outputs."""
        with torch.no_grad(), record_function(TEACHER_FORWARD):
            teacher_out = self._teacher(input_ids, position_ids, attention_mask)
        with record_function(STUDENT_FORWARD):
            student_out = self.student(input_ids, position_ids, attention_mask)
        if self.post_process:
            return student_out, teacher_out.detach()
        return torch.cat([student_out, teacher_out.detach()], dim=1)
