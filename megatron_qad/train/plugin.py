"""The pieces ``megatron.training.pretrain`` takes to run QAD: model provider, forward step,
dataset provider and the teacher-student pipeline communicator.

    from megatron.training import pretrain
    pretrain(cfg_container, datasets_provider, ModelType.encoder_or_decoder, forward_step,
             model_provider=model_provider, p2p_communicator=..., pg_collection=...)

(:func:`megatron_qad.train.megatron.run_pretrain` makes that call for both front doors.)

* :func:`model_provider` builds this rank's stage of the student and of the teacher from the
  Megatron arguments, loads the teacher's checkpoint into both, quantizes the student by the
  recipe's policy and returns the :class:`~megatron_qad.distill.TeacherStudentStage` (in
  ``--qad-mode teacher``, a plain model trained with cross entropy).
* :func:`forward_step` runs one micro-batch through the stage and returns the loss function in
  megatron.core's per-token contract; training losses go to the divergence guard
  (:mod:`.divergence`), which the model provider installs as the models' gradient finalization:
  a step with a non-finite loss or gradient is skipped or stops the run (``--qad-on-nonfinite``).
* :func:`datasets_provider` builds the package's token sources (Megatron's ``--data-path`` /
  ``--mock-data`` use Megatron's own GPT datasets instead), says how many times the run reads
  each split and refuses data a QAD run would misuse (:mod:`megatron_qad.data.repeats`).
  ``pretrain`` calls it after the model, optimizer and any checkpoint are set up and before the
  first step: a fresh run
  calibrates there (PTQ, :func:`megatron_qad.train.ptq.calibrate_and_evaluate`) over the first
  ``distill.calibration_iters`` global batches of the same training data.
* :class:`TeacherStudentCommunicator`: the schedules size the p2p buffers for ``b`` sequences;
  a teacher-student stage sends ``2b`` (student and teacher joined on the batch dimension).
"""

from __future__ import annotations

import functools

import torch
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

from .. import quantize
from ..data.repeats import check_data_use, repeat_line
from ..distill import DistillationLoss, TeacherStudentStage
from ..distill.pipeline import forward_micro_batch, prepare_pipeline_config
from ..models import build_model
from . import checkpointing
from .arguments import model_config_from_args, parallel_config_from_args, qad_sections_from_args
from .state import RunState


def _args():
    from megatron.training import get_args

    return get_args()


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None,
                   config=None, pg_collection=None) -> torch.nn.Module:
    """This rank's (virtual) stage: a TeacherStudentStage, or a plain model in teacher mode.

    ``pre_process`` / ``post_process`` are Megatron's; the builders derive the same from the
    parallel state (checked). The models are built on this rank's device in the recipe's dtype.
    """
    args, state = _args(), RunState.get()
    model_cfg, parallel_cfg = model_config_from_args(args), parallel_config_from_args(args)
    student = build_model(model_cfg, parallel_cfg, state.device, vp_stage)
    if (student.pre_process, student.post_process) != (pre_process, post_process):
        raise RuntimeError(f"stage of virtual stage {vp_stage}: Megatron asks pre/post "
                           f"{pre_process}/{post_process}, the model has {student.pre_process}/{student.post_process}")
    prepare_pipeline_config(student.config, state.device,
                            interleaved=(args.virtual_pipeline_model_parallel_size or 1) > 1)
    student.config.finalize_model_grads_func = state.guard.finalize_model_grads
    if args.qad_mode == "teacher":
        state.chunks.append(student)
        return student
    teacher = build_model(model_cfg, parallel_cfg, state.device, vp_stage)
    sections = state.sections
    state.pending_teacher_loads.append((student, teacher))
    stage = TeacherStudentStage(student, teacher)
    state.communicator.config = stage.config  # the schedules' p2p settings are the student's
    state.chunks.append(stage)
    if len(state.chunks) == (args.virtual_pipeline_model_parallel_size or 1):
        _load_and_quantize(state, sections)
    return stage


def _load_and_quantize(state: RunState, sections) -> None:
    """Load the teacher checkpoint into every chunk's teacher and student (one collective load
    per model), then quantize the students (every chunk is built by then)."""
    teachers = [teacher for _, teacher in state.pending_teacher_loads]
    students = [student for student, _ in state.pending_teacher_loads]
    directory = sections.teacher.checkpoint
    checkpointing.load_model(teachers, directory)
    state.teacher_gib = sum(p.numel() * p.element_size() for teacher in teachers for p in teacher.parameters()) / 2**30
    state.print(f"teacher: {state.teacher_gib:.3f} GiB of weights on this rank (frozen: no gradients, "
                f"no optimizer state), from {directory}")
    checkpointing.load_model(students, directory)
    report = quantize.apply(students, sections.quantization.to_policy(), backend=state.backend)
    state.print(report.format_table().splitlines()[-1])
    if state.student_load:
        checkpointing.load_model(students, state.student_load)
        state.print(f"student: loaded from {state.student_load}")
    state.pending_teacher_loads.clear()


class TeacherStudentCommunicator(P2PCommunicator):
    """megatron.core's pipeline p2p, with buffers for the student's and the teacher's activations.

    The schedules size p2p tensors as ``[s, b, h]`` (``b``: Megatron's ``--micro-batch-size``);
    a TeacherStudentStage sends and receives ``[s, 2b, h]`` (see its module docstring). Every
    transfer goes through ``_communicate``, whose ``tensor_shape`` this doubles in dimension 1."""

    def _communicate(self, *, tensor_shape, **kwargs):
        return super()._communicate(tensor_shape=_joined_shape(tensor_shape), **kwargs)


def _joined_shape(shape):
    """``[s, b, h]`` -> ``[s, 2b, h]`` (a list of shapes element-wise; None stays None)."""
    if shape is None:
        return None
    if shape and isinstance(shape[0], (list, tuple)):
        return [_joined_shape(one) for one in shape]
    seq, batch, *rest = shape
    return (seq, 2 * batch, *rest)


def forward_step(data_iterator, model: torch.nn.Module, return_schedule_plan: bool = False):
    """Megatron's ``forward_step_func``: one micro-batch through ``model`` (this rank's stage);
    returns the output and the loss function (the recipe's distillation loss; cross entropy in
    teacher mode) in megatron.core's per-token contract."""
    args, state = _args(), RunState.get()
    timers = _timers()
    timers("batch-generator", log_level=2).start()
    batch = next(data_iterator)
    timers("batch-generator").stop()
    output, loss_func = forward_micro_batch(state.loss, args.micro_batch_size, args.seq_length, state.device,
                                            batch, model)
    return output, functools.partial(_checked_loss, loss_func)


def _timers():
    from megatron.training import get_timers

    return get_timers()


def _checked_loss(loss_func, output):
    """``loss_func(output)``; a training micro-batch's metrics are kept for the loss curve and its
    loss goes to the divergence guard (:mod:`.divergence`)."""
    from megatron.core.rerun_state_machine import get_rerun_state_machine

    loss, num_tokens, report = loss_func(output)
    if torch.is_grad_enabled():  # a training step, not validation
        state = RunState.get()
        state.record(get_rerun_state_machine().current_iteration, report)
        state.guard.add_loss(loss, num_tokens)
    return loss, num_tokens, report


class SampleView(torch.utils.data.Dataset):
    """The first ``length`` samples of a package dataset (which repeats without end), as the map-
    style dataset Megatron's samplers index."""

    def __init__(self, dataset, length: int):
        self.dataset, self.length = dataset, int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.dataset[index]


def datasets_provider(train_valid_test_num_samples, vp_stage: int | None = None):
    """Megatron's ``train_valid_test_dataset_provider``: (train, validation, test) datasets of the
    requested sizes; on a fresh QAD run, calibrate the student first (see the module docstring)."""
    args, state = _args(), RunState.get()
    train_samples, valid_samples, _ = train_valid_test_num_samples
    if args.data_path or args.mock_data:
        train, validation, test = _megatron_gpt_datasets(args, train_valid_test_num_samples)
        state.use_datasets(train, validation)
    else:
        train, validation = state.datasets()
        if vp_stage in (None, 0):
            _check_data_use(args, state, train, validation, train_samples, max(valid_samples, 1))
        train, validation, test = SampleView(train, train_samples), SampleView(validation, max(valid_samples, 1)), None
    if vp_stage in (None, 0):
        state.start_iteration = args.iteration
        if args.qad_mode == "qad":
            state.calibrate_if_fresh(args.iteration, *state.datasets())
    return train, validation, test


datasets_provider.is_distributed = True  # every rank builds the same (deterministic) data


def _check_data_use(args, state: RunState, train, validation, train_samples: int, validation_samples: int) -> None:
    """Print how many times the run reads each split's samples; in a QAD run that trains, refuse
    the data uses of :func:`megatron_qad.data.repeats.check_data_use` (every rank)."""
    data = state.sections.data
    state.print(repeat_line(train, validation, train_samples, validation_samples))
    if args.qad_mode == "qad" and not args.skip_train:
        check_data_use(train, validation, train_samples, data.max_repeats, data.allow_validation_copy,
                       "data.validation_sources" if data.validation_sources else "data.sources")


def _megatron_gpt_datasets(args, train_valid_test_num_samples):
    """Megatron's GPT datasets (``--data-path`` blends, ``--mock-data``), as ``pretrain_gpt.py``
    builds them."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    from megatron.core.datasets.utils import get_blend_from_list
    from megatron.training import get_tokenizer

    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length,
        blend=get_blend_from_list(args.data_path), split=args.split, tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids, reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss, path_to_cache=args.data_cache_path, mid_level_dataset_surplus=0.005)
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(dataset_type, train_valid_test_num_samples, lambda: True, config).build()

