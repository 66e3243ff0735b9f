"""One QAD job through ``megatron.training.pretrain``, from a Megatron-LM command line.

    summary = run_pretrain(argv)   # argv: Megatron-LM flags + the QAD flags (see .arguments)

Both front doors end here: ``scripts/pretrain_qad.py`` passes its command line, and
``megatron-qad train RECIPE`` the command line its recipe compiles to. The sequence on every rank:

1. Megatron's parser reads ``argv`` (plus the ``--qad-*`` flags) and validates it; a resume
   (``--load``) is checked against its checkpoint's LR schedule and iteration (:mod:`.resume`);
2. torch.distributed and megatron.core's parallel groups are set up by
   :func:`megatron_qad.parallel.initialize` (NCCL on GPUs; gloo and the CPU shims of
   :mod:`megatron_qad.cpu_support` where no GPU is visible); the run takes the lock of ``--save``
   (:mod:`.writer_lock`: another run there is refused; the launch's settings are recorded there
   once Megatron's set-up and the data checks passed: :mod:`.launches`); then Megatron's globals;
3. ``pretrain`` runs with the pieces of :mod:`.plugin`: the model provider (teacher loaded and
   frozen, student quantized), the dataset provider (a fresh run calibrates there: PTQ), the
   forward step, and the pipeline communicator for the joined student / teacher activations.
   Megatron's loop then owns the steps, the optimizer and LR schedule, checkpoints
   (``--save`` / ``--load``: ``iter_NNNNNNN``, ``latest_checkpointed_iteration.txt``), the signal
   handler, ``--exit-interval`` and ``--exit-duration-in-mins``; a step with a non-finite loss or
   gradient is skipped or stops the run (:mod:`.divergence`, ``--qad-on-nonfinite``);
4. the student is evaluated against the teacher on the first ``--eval-iters`` validation
   batches, as after calibration, and the summary is returned (and written with ``--qad-summary``).

A run that Megatron ends early (exit interval, signal, duration; it calls ``sys.exit``) or that the
divergence policy stops returns a summary with ``stopped_at`` and the exit code instead of the
final figures. ``skipped`` lists the iterations the policy skipped, when there were any.
"""

from __future__ import annotations

import signal
import time

import torch.distributed as dist

from .. import parallel, quantize
from ..checkpoint_tracker import saved_iteration
from ..config import ConfigError
from ..distill import DistillationLoss
from ..models import transformer_config
from . import checkpointing, divergence, launches, megatron_fixes, teacher_state, writer_lock
from .arguments import (megatron_log, model_config_from_args, parallel_config_from_args, parse_megatron_args,
                        qad_sections_from_args, write_summary)
from .console import megatron_output
from .metrics import memory_gib
from .preflight import nvfp4_backend
from .resume import check_resume
from .save_faults import install as explain_save_failures
from .plugin import TeacherStudentCommunicator, datasets_provider, forward_step, model_provider
from .state import RunState, run_state
from .summary import human_lines, record_path, short_line


def run_pretrain(argv: list[str], recipe_keys: bool = False) -> dict:
    """Run QAD (or, with ``--qad-mode teacher``, plain training) for the Megatron-LM command line
    ``argv``; returns the summary (on every rank). See the module docstring. ``recipe_keys``: the
    command line was compiled from a recipe, whose keys errors name instead of Megatron's flags."""
    start_time = time.perf_counter()
    args = parse_megatron_args(argv)
    check_resume(args, recipe_keys)
    model_cfg, parallel_cfg = model_config_from_args(args), parallel_config_from_args(args)
    sections = qad_sections_from_args(args)
    if args.qad_mode == "qad" and not sections.teacher.checkpoint:
        raise ConfigError("no teacher: pass --qad-teacher-load DIR (a Megatron-LM or megatron.core "
                          "checkpoint of the BF16 model), or set teacher.checkpoint in the --qad-recipe")
    if args.qad_mode == "qad":
        teacher = sections.teacher.checkpoint
        teacher_state.check_finished(teacher, writer_lock.setting_name(
            "teacher.checkpoint" if recipe_keys else "--qad-teacher-load", teacher))
    handlers = _exit_signal_handlers(args)
    created = not dist.is_initialized()
    context = parallel.initialize(parallel_cfg, backend=args.distributed_backend, seed=args.seed)
    save_key = ("teacher.checkpoint" if args.qad_mode == "teacher" else "checkpoint.save") if recipe_keys else "--save"
    try:
        with writer_lock.hold(args.save, save_key):  # one run per --save, refused before it writes
            if args.save and context.rank == 0 and args.qad_mode == "teacher":
                teacher_state.mark(args.save, "training", args.train_iters)
            provider = launches.recorded(datasets_provider, args, argv, rank0=context.rank == 0)
            return _pretrain(args, model_cfg, parallel_cfg, sections, context, start_time, provider)
    finally:
        _reset_megatron_globals()
        parallel.destroy(keep_process_group=not created)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _pretrain(args, model_cfg, parallel_cfg, sections, context, start_time: float, provider) -> dict:
    """``pretrain`` with the plugin's pieces and ``provider`` (the dataset provider); the summary."""
    from megatron.core.enums import ModelType
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.global_vars import set_global_variables

    megatron_fixes.apply()
    explain_save_failures()
    guard = divergence.DivergenceGuard(args.qad_on_nonfinite, args.qad_max_skipped_steps, context.device,
                                       rank0=context.rank == 0, max_loss_spike=args.qad_max_loss_spike)
    if args.tokenizer_type is None:  # the package's data sources tokenize themselves
        args.padded_vocab_size = args.vocab_size
    with megatron_output(megatron_log(args)):
        set_global_variables(args, build_tokenizer=args.tokenizer_type is not None)
    if args.exit_signal_handler:
        exit_signals = _stop_on_extra_signals(args.qad_extra_exit_signals)
        if args.save:
            _start_save_results_queue(exit_signals)
    d = sections.distill
    loss = (DistillationLoss("ce") if args.qad_mode == "teacher"
            else DistillationLoss(d.loss, alpha=d.alpha, temperature=d.temperature))
    backend = nvfp4_backend(sections.quantization, model_cfg, context.device)
    pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    communicator = TeacherStudentCommunicator(pg_collection.pp, transformer_config(model_cfg, parallel_cfg,
                                                                                  context.device))
    summary = {"mode": args.qad_command if args.qad_mode == "qad" else "teacher", "ptq": None}
    with run_state(device=context.device, sections=sections, backend=backend, loss=loss,
                   seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
                   global_batch_size=args.global_batch_size, vocab_size=model_cfg.vocab_size,
                   eval_iters=args.eval_iters, cache_dir=args.save, rank0=context.rank == 0, guard=guard,
                   communicator=communicator, student_load=args.qad_student_load) as state:
        cfg_container = pretrain_cfg_container_from_args(args)
        try:
            with megatron_output(megatron_log(args)):
                pretrain(cfg_container, provider, ModelType.encoder_or_decoder, forward_step,
                         model_provider=model_provider,
                         p2p_communicator=communicator if args.qad_mode == "qad" else None,
                         pg_collection=pg_collection if args.qad_mode == "qad" else None)
        except (SystemExit, divergence.NonFiniteStep) as stop:  # Megatron's early exits; divergence
            if isinstance(stop, divergence.NonFiniteStep):
                summary["stopped_at"], summary["exit_code"] = stop.iteration, divergence.EXIT_CODE
                message = _divergence_message(args, guard, stop)
            else:  # exit interval, signal, duration, Megatron's result validation
                summary["stopped_at"] = getattr(args, "curr_iteration", -1) + 1
                summary["exit_code"] = stop.code if isinstance(stop.code, int) else 1
                message = _stop_message(args, summary)
            _add_training_figures(summary, state, summary["stopped_at"])
            state.print(message)
            if summary["exit_code"] and args.qad_mode == "teacher":
                raise SystemExit(summary["exit_code"]) from None
            return _finish(summary, args, context, start_time)
        _add_training_figures(summary, state, getattr(args, "curr_iteration", -1) + 1)
        if args.qad_mode == "qad":
            _after_training(args, state, summary)
        elif args.save and state.rank0:  # every iteration trained and saved: a teacher to distil from
            teacher_state.mark(args.save, "finished", args.train_iters)
        return _finish(summary, args, context, start_time)


def _add_training_figures(summary: dict, state: RunState, end: int) -> None:
    """The PTQ figures, the loss curve of this job's iterations up to ``end`` (1-based, Megatron's
    count) and the iterations the divergence policy skipped (when there were any)."""
    summary["ptq"] = state.ptq
    summary["train"] = state.loss_curve(state.start_iteration, end)
    if state.guard.skipped:
        summary["skipped"] = state.guard.skipped


def _stop_message(args, summary: dict) -> str:
    """One line on why and where Megatron stopped the run, and how to go on."""
    where = f"after iteration {summary['stopped_at']}"
    if summary["exit_code"] == 0:
        saved = f"; checkpoint in {args.save}, resume with the same command" if args.save else ""
        return f"stopped {where} (exit interval, duration or signal){saved}"
    return (f"stopped in iteration {summary['stopped_at']} with exit code {summary['exit_code']} (Megatron's "
            f"result validation, see the lines above); that step was not applied, {_last_checkpoint(args)}")


def _divergence_message(args, guard: divergence.DivergenceGuard, stop: divergence.NonFiniteStep) -> str:
    """One line on the step that stopped the run: its iteration, what was not finite, the steps
    skipped before it, the setting that decided and the last good checkpoint."""
    if guard.policy == "stop":
        rule = " (training.on_nonfinite=stop, --qad-on-nonfinite; 'skip' drops such a step and goes on)"
    else:
        count = len(stop.skipped) + 1
        if count == 1:
            skipped = ""
        elif count == 2:
            skipped = f" (iteration {stop.skipped[0]} skipped)"
        else:
            skipped = f" (iterations {stop.skipped[0]}-{stop.skipped[-1]} skipped)"
        rule = (f", {count} non-finite step{'s' if count > 1 else ''} in a row{skipped} "
                f"{'are' if count > 1 else 'is'} more than training.max_skipped_steps={guard.max_skipped_steps} "
                f"(--qad-max-skipped-steps)")
    return (f"stopped in iteration {stop.iteration}: {stop.value}{rule}. The step was not applied, "
            f"{guard.last_good_checkpoint(args.save) or _last_checkpoint(args)}; a diverging run needs a lower "
            f"learning rate")


def _last_checkpoint(args) -> str:
    """Where the newest complete checkpoint of ``--save`` is (Megatron's tracker names it)."""
    if not args.save:
        return "no checkpoint was saved (--save unset)"
    iteration = saved_iteration(args.save)
    if iteration is None:
        return f"no checkpoint was saved in {args.save} yet"
    return f"the last good checkpoint is iteration {iteration} in {args.save}"


def _after_training(args, state: RunState, summary: dict) -> None:
    """The student's final validation figures; the saves and reports the QAD flags ask for."""
    _, validation = state.datasets()
    summary["final"] = state.evaluate(validation)
    state.print("validation (final) | " + " | ".join(f"{name} {value:.4E}" for name, value in summary["final"].items()))
    students = [chunk.student for chunk in state.chunks]
    if args.qad_save_student:
        checkpointing.save_model(students, args.qad_save_student)
        state.print(f"student saved at {args.qad_save_student}")
    if args.qad_eval_report:
        report = quantize.report(students, state.sections.quantization.to_policy())
        state.print(report.format_table())
        summary["student"] = args.qad_student_load
        summary["layers"] = [{"name": row.name, "kind": row.kind, "weight": row.weight_format,
                              "input": row.input_format, "params": row.params,
                              "rel_mse": row.rel_mse_4over6 if row.weight_format == "nvfp4_4over6" else row.rel_mse_nvfp4}
                             for row in report.rows]
        if state.rank0:
            write_summary(args.qad_eval_report, summary)


def _finish(summary: dict, args, context, start_time: float) -> dict:
    """Add the derived figures to ``summary``; on rank 0 write it to its record file (the whole
    summary) and print the short line and the lines for a person (:mod:`.summary`); return it."""
    state = RunState.get()
    if state.teacher_gib is not None:
        summary["teacher GiB"] = round(state.teacher_gib, 3)
    ptq, final = summary.get("ptq"), summary.get("final")
    if ptq and final and ptq.get("kl", 0) > 0:
        summary["kl_reduction"] = 1.0 - final["kl"] / ptq["kl"]
    summary["seconds"] = round(time.perf_counter() - start_time, 1)
    peak = memory_gib(context.device)
    if peak is not None:
        summary["peak GiB"] = round(peak, 2)
    summary["tokens"] = len(summary.get("train") or []) * args.global_batch_size * args.seq_length
    student = _student_checkpoint(args)
    if student:
        summary["checkpoint"] = student
    record, log = record_path(args), megatron_log(args)
    if record:
        summary["record"] = record
    if log:
        summary["log"] = log
    if context.rank == 0:
        if record:
            write_summary(record, summary)
        print(short_line(summary), flush=True)
        print("\n".join(["", *human_lines(summary)]), flush=True)
    if dist.is_initialized():
        dist.barrier()
    return summary


def _student_checkpoint(args) -> dict | None:
    """Where the run's model is: ``{"dir": ...}`` for ``--qad-save-student``, or, without
    training (``--skip-train``), the evaluated ``--qad-student-load``; else ``{"dir": ...,
    "iteration": ...}`` for ``--save``'s newest checkpoint (a teacher's too); None when there is none."""
    if args.qad_mode == "qad" and (args.qad_save_student or (args.skip_train and args.qad_student_load)):
        return {"dir": args.qad_save_student or args.qad_student_load}
    iteration = saved_iteration(args.save) if args.save else None
    return {"dir": args.save, "iteration": iteration} if iteration is not None else None


def _exit_signal_handlers(args) -> dict:
    """The handlers the exit signals (``--exit-signal`` and ``--qad-extra-exit-signals``, with
    ``--exit-signal-handler``) have before the run, for :func:`run_pretrain` to give back after it.
    Megatron installs its flagging handler for the run and never removes it, nor does its global
    teardown: after a run, SIGTERM and SIGINT would only set a flag that no loop reads any more, so
    a process that goes on (a benchmark's next run, an evaluation, an interactive session) could be
    neither stopped nor interrupted. A signal that arrives after the loop's last check of a run that
    then finishes (and saves) is not acted on."""
    if not args.exit_signal_handler:
        return {}
    return {sig: signal.getsignal(sig) for sig in [args.exit_signal, *_extra_exit_signals(args.qad_extra_exit_signals)]}


def _extra_exit_signals(names: str) -> list[signal.Signals]:
    """The signals ``names`` (``--qad-extra-exit-signals``, comma-separated) names; a bad name is one line."""
    signals = []
    for name in filter(None, (part.strip() for part in names.split(","))):
        try:
            signals.append(signal.Signals[name])
        except KeyError:
            raise ConfigError(f"--qad-extra-exit-signals: {name!r} is not a signal name; use e.g. SIGINT,SIGUSR1") from None
    return signals


def _stop_on_extra_signals(names: str) -> list:
    """Make each signal of ``names`` (comma-separated) stop the run as ``--exit-signal`` does:
    Megatron's handler only flags the signal, and its loop then saves and exits after the current
    step on every rank (the flags are all-gathered, so one rank's signal is enough). Returns all
    the exit signals: ``--exit-signal`` and these."""
    from megatron.training import get_signal_handler

    first = get_signal_handler().sig
    flag = signal.getsignal(first)  # Megatron's handler: records the signal
    extra = _extra_exit_signals(names)
    for sig in extra:
        signal.signal(sig, flag)
    return [first, *extra]


_signal_proof_queue = None
"""The save-results queue :func:`_start_save_results_queue` started last in this process."""


def _start_save_results_queue(exit_signals: list) -> None:
    """Start megatron.core's checkpoint-save results queue now, with ``exit_signals`` blocked, so
    that an exit signal sent to every process of the job cannot end it before the save it asks for,
    and tied to this rank's life, so that it never outlives it.

    Every torch_dist save (a synchronous one, as the recipes make) passes its write results
    through a multiprocessing Manager queue that megatron.core starts on the first save
    (``filesystem_async.get_write_results_queue``: a spawned Python process, kept in the module's
    ``_results_queue``). SLURM's warning signal reaches every process of the job step, that one too,
    which starts with the default action for the signals this rank handles (exec resets handlers)
    and dies of it; the save then fails with BrokenPipeError. Blocked signals stay blocked across
    fork and exec (CPython starts its multiprocessing resource tracker the same way), so the queue's
    process never acts on them; here they are blocked in this thread only for the moment the start
    takes, and a signal arriving then is handled after it, not lost. The queue's process is started
    here as megatron.core starts it (a spawn-context manager), with :func:`_die_with_parent` as its
    initializer: a rank that is killed (no exit handlers run) takes it along instead of leaving an
    orphan that ignores SIGTERM. A queue megatron.core started before in this process (a save
    outside a run: an import, a PTQ student written by an earlier run of a benchmark) is replaced;
    its process ends with its last reference."""
    import multiprocessing
    import os
    from multiprocessing import resource_tracker
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    global _signal_proof_queue
    if _signal_proof_queue is not None and filesystem_async._results_queue is _signal_proof_queue:
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, exit_signals)
    try:
        # The queue's start needs the resource tracker, whose own start (once per process) ends by
        # unblocking SIGINT and SIGTERM in this thread: start it first, then block them again.
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, exit_signals)
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(_die_with_parent, (os.getpid(),))
        _signal_proof_queue = filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager alive
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _die_with_parent(parent_pid: int) -> None:
    """In the save-results queue's process: have Linux SIGKILL it when ``parent_pid`` (the rank
    that started it) dies, or exit now if that already happened (elsewhere: nothing)."""
    import ctypes
    import os
    import sys

    if not sys.platform.startswith("linux"):
        return
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(0)


def _reset_megatron_globals() -> None:
    """Undo what ``pretrain`` set globally, so another run can start in this process."""
    from megatron.core.num_microbatches_calculator import unset_num_microbatches_calculator
    from megatron.core.rerun_state_machine import destroy_rerun_state_machine
    from megatron.training.global_vars import destroy_global_vars

    destroy_global_vars()
    unset_num_microbatches_calculator()
    destroy_rerun_state_machine()
