"""What the result benchmarks (``reproduce_qad.py``, ``real_model.py``) share: their command line's
lists (variants, seeds, learning rates), the processes their runs share a GPU in (``--jobs``), run
directory names, the learning-rate sweep table and the marked section of a Markdown file they write
their tables into."""

import argparse
import contextlib
import multiprocessing
import os
import re
import signal
import sys
import traceback
from concurrent.futures import CancelledError, Executor, Future, ProcessPoolExecutor
from collections.abc import Callable, Sequence
from pathlib import Path


def variant_names(parser: argparse.ArgumentParser, text: str, variants: Sequence[str]) -> list[str]:
    """The variants ``text`` names (``all`` or comma-separated names); an unknown one is a usage error."""
    names = list(variants) if text == "all" else [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in variants]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; the variants are {list(variants)}")
    return names


class InProcess(Executor):
    """An executor that runs each call at once, in this process (``--jobs 1``): a call's exception
    comes out of ``submit``, so a failed run ends the program before the next one starts."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


class WorkerProcesses(ProcessPoolExecutor):
    """``max_workers`` spawned worker processes (each starts its own CUDA context) that a stop
    signal stops without losing work.

    Inside ``with``, a stop signal this process gets (:data:`STOP_SIGNALS`: a scheduler's,
    ``timeout``'s, Ctrl-C) is passed on to the workers, and no call starts after it (a worker checks
    a shared flag before each call: the pool hands out calls ahead of time); this process
    goes on waiting for the running calls. A worker ignores the signals outside a training run,
    whose own handler (Megatron's) saves and stops it; a call that is evaluating finishes.
    Otherwise a SIGTERM to this process alone would not stop the runs, one to the whole process
    group would end this process at once while its workers were saving, and an idle worker's death
    would break the pool. A call that fails does not stop the others (the pool runs every call
    handed to it, even when the ``with`` body raises); :func:`collect` waits for them all and
    reports the failures."""

    STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self, max_workers: int):
        context = multiprocessing.get_context("spawn")
        self._stopped = context.Event()
        super().__init__(max_workers=max_workers, mp_context=context, initializer=_start_worker,
                         initargs=(self._stopped,))

    def submit(self, fn, /, *args, **kwargs) -> Future:
        return super().submit(_unless_stopped, fn, *args, **kwargs)

    def __enter__(self):
        self._handlers = {sig: signal.signal(sig, self._stop) for sig in self.STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for sig, handler in self._handlers.items():
                signal.signal(sig, handler)

    def _stop(self, signum, frame) -> None:
        self._stopped.set()
        # ProcessPoolExecutor keeps its live workers by PID in _processes (None once shut down).
        for pid in list(self._processes or {}):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)


_STOPPED = None
"""In a worker of :class:`WorkerProcesses`: the pool's flag that a stop signal has come."""


def _start_worker(stopped) -> None:
    """A worker's initializer: ignore the stop signals (see :class:`WorkerProcesses`), keep the flag."""
    global _STOPPED
    _STOPPED = stopped
    for sig in WorkerProcesses.STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _unless_stopped(fn, /, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a worker, unless a stop signal came before it started."""
    if _STOPPED.is_set():
        raise CancelledError()
    return fn(*args, **kwargs)


def executor(jobs: int) -> Executor:
    """``jobs`` :class:`WorkerProcesses`, or this process for 1."""
    if jobs == 1:
        return InProcess()
    return WorkerProcesses(jobs)


def collect(futures: Sequence[Future], program: str, labels: Sequence[str] | None = None) -> list:
    """The calls' results in order, once every call has ended: a failed call does not stop the
    others. ``labels`` name the calls (e.g. ``"QAD (teacher responses), seed 1, lr 3e-05"``; by
    default ``run 1``, ``run 2``, ...).

    When a call failed, each failure goes to stderr (its traceback; a call's own SystemExit with a
    message, such as a stopped training run's "stopped at iteration" line, as that message) and
    ``program`` ends with one line naming each failed call, its exception's type and the first line
    of its message. When a stop signal kept a call from starting, ``program`` ends with one line
    saying so instead: the signal, not a failure, is then the reason. Either way the finished runs
    have kept their records."""
    labels = list(labels) if labels is not None else [f"run {index}" for index in range(1, len(futures) + 1)]
    results, failures, stopped = [], [], False
    for future, label in zip(futures, labels, strict=True):
        try:
            results.append(future.result())
        except CancelledError:
            stopped = True
        except (Exception, SystemExit) as error:
            failures.append((label, error))
    for label, error in failures:
        print_failure(program, label, error)
    if stopped:
        raise SystemExit(f"{program}: stopped by a signal before every run had started; run the same command "
                         f"again to continue")
    if failures:
        summary = "; ".join(f"{label}: {one_line(error)}" for label, error in failures)
        raise SystemExit(f"{program}: {len(failures)} of {len(futures)} runs failed ({summary}); the finished runs "
                         f"kept their records: run the same command again to retry the rest")
    return results


def run_label(name: str, seed: int, lr: float | None) -> str:
    """A run as :func:`collect` names it: ``"NAME, seed SEED"``, then ``", lr LR"`` when the run
    sets its own learning rate (None: the recipe's)."""
    return f"{name}, seed {seed}" + (f", lr {lr:g}" if lr is not None else "")


def print_failure(program: str, label: str, error: BaseException) -> None:
    """Print to stderr that the call ``label`` failed with ``error``: a SystemExit with a message as
    that message, any other exception with its traceback (a worker's includes the worker's own)."""
    if isinstance(error, SystemExit) and isinstance(error.code, str):
        print(error.code, file=sys.stderr, flush=True)
        return
    print(f"{program}: {label} failed:", file=sys.stderr)
    traceback.print_exception(error, file=sys.stderr)
    sys.stderr.flush()


def one_line(error: BaseException) -> str:
    """``error`` in one line: its type and the first line of its message (the type alone without one)."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines and lines[0].strip() else type(error).__name__


def number_list(parser: argparse.ArgumentParser, flag: str, text: str, kind=float) -> list:
    """The comma-separated numbers of ``text`` (``''``: none), each a ``kind``; a bad one is a usage
    error naming ``flag``."""
    try:
        return [kind(item) for item in text.split(",") if item.strip()]
    except ValueError:
        parser.error(f"{flag}: {text!r} is not a comma-separated list of {kind.__name__} numbers")


def slug(text: str) -> str:
    """A variant's name as a directory name: lower case, each run of other characters one '_'."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def sweep_table(rows: list[dict], columns: Sequence[tuple[str, str]], format_value: Callable[[str, list], str]) -> str:
    """One line per run (``variant``, ``lr`` and the ``columns`` keys of each row, sorted by variant then
    lr); ``columns`` are ``(key, title)``, ``format_value(key, [value])`` writes a cell."""
    lines = ["| model | lr | " + " | ".join(title for _, title in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for row in sorted(rows, key=lambda row: (row["variant"], row["lr"])):
        lines.append(f"| {row['variant']} | {row['lr']:g} | "
                     + " | ".join(format_value(key, [row[key]]) for key, _ in columns) + " |")
    return "\n".join(lines)


def write_between_markers(path: Path, text: str, begin: str, end: str) -> None:
    """Put ``text`` between the lines ``begin`` and ``end`` of ``path``; a file without them gets the
    marked text appended (a missing file is created holding just it)."""
    old = path.read_text() if path.is_file() else ""
    marked = f"{begin}\n{text}{end}"
    if begin in old and end in old:
        before, rest = old.split(begin, 1)
        new = before + marked + rest.split(end, 1)[1]
    else:
        new = old + ("\n" if old and not old.endswith("\n") else "") + marked
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new if new.endswith("\n") else new + "\n")
