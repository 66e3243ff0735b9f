"""A checkpoint save that fails to write (a full disk, a quota, a read-only file system) ends the run
in one line naming the iteration, the directory, the cause, the file and the last good checkpoint.

megatron.core's torch_dist writer catches the ``OSError`` of a failed write in its worker, logs it,
and passes on only its type: the run ended in ``RuntimeError: Worker failure: ... error: <class
'OSError'>`` inside a ``CheckpointException`` traceback, without "No space left on device".
:func:`install` (before ``pretrain``; idempotent):

1. keeps the write errors of megatron.core's ``FileSystemWriterAsync`` workers on this rank;
2. turns a failure of Megatron's ``save_checkpoint`` into a
   :class:`~megatron_qad.config.ConfigError` with that line: the rank whose write failed names its
   error, the others the ranks that failed. Megatron writes ``latest_checkpointed_iteration.txt``
   only after a complete save, so the checkpoint it names (the last good one) is what the same
   command resumes from once the cause is fixed; the partial ``iter_`` directory is written again
   when the run reaches that iteration.

Saves run synchronously (the recipes do not ask for Megatron's ``--async-save``, whose writer
process keeps its errors to itself).
"""

from __future__ import annotations

import errno
import functools

from ..checkpoint_tracker import saved_iteration
from ..config import ConfigError

_write_errors: list[tuple[str, OSError]] = []
"""(file, error) of this rank's failed checkpoint writes since the current save began."""


def install() -> None:
    """Keep the writers' errors and explain a failed save (see the module docstring)."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
    from megatron.training import training

    if not getattr(FileSystemWriterAsync.write_preloaded_data, "keeps_write_errors", False):
        FileSystemWriterAsync.write_preloaded_data = staticmethod(
            _keeping_errors(FileSystemWriterAsync.write_preloaded_data))
    if not getattr(training.save_checkpoint, "explains_failures", False):
        training.save_checkpoint = _explaining(training.save_checkpoint)


class _KeepingQueue:
    """A writer thread's results queue that keeps the write error put on it, with the thread's ``file``."""

    def __init__(self, queue, file: str):
        self._queue, self._file = queue, file

    def put(self, item, *args, **kwargs):
        _keep(item, self._file)
        return self._queue.put(item, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._queue, name)


def _keep(output, file: str) -> None:
    """Keep the error of a writer's ``(worker index, results or exception)`` writing ``file``, if
    it is an OSError."""
    if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], OSError):
        _write_errors.append((file, output[1]))


def _keeping_errors(write_preloaded_data):
    """megatron.core's writer (the main worker returns its output, a thread puts it on a queue),
    keeping their write errors."""

    @functools.wraps(write_preloaded_data)
    def keeping(*args, **kwargs):
        file = str(kwargs["write_bucket"][0])  # (file name, storage key, data)
        if kwargs.get("results_queue") is not None:
            kwargs["results_queue"] = _KeepingQueue(kwargs["results_queue"], file)
        output = write_preloaded_data(*args, **kwargs)
        _keep(output, file)
        return output

    keeping.keeps_write_errors = True
    return keeping


def _explaining(save_checkpoint):
    """Megatron's ``save_checkpoint(iteration, ...)``, whose failure after a write error raises
    ConfigError with the one line of :func:`failure_message`."""
    from torch.distributed.checkpoint.api import CheckpointException

    @functools.wraps(save_checkpoint)
    def explaining(iteration, *args, **kwargs):
        from megatron.training import get_args

        _write_errors.clear()
        try:
            return save_checkpoint(iteration, *args, **kwargs)
        except (Exception, CheckpointException) as failure:
            failed_ranks = sorted(getattr(failure, "failures", None) or ())
            if not _write_errors and not failed_ranks:
                raise
            cause = _write_errors[0] if _write_errors else None
            raise ConfigError(failure_message(iteration, get_args().save, cause, failed_ranks)) from None
        finally:
            _write_errors.clear()

    explaining.explains_failures = True
    return explaining


def failure_message(iteration: int, directory: str, cause: tuple[str, OSError] | None,
                    failed_ranks: list[int]) -> str:
    """The line for a save of ``iteration`` into ``directory`` whose write of a file failed with an
    error on this rank (``cause``: (file, error)), or on ``failed_ranks`` (``cause`` None)."""
    if cause is None:
        what = f"a write failed on rank {', '.join(map(str, failed_ranks))} (its error line says why)"
        fix = "fix the cause"
    else:
        file, error = cause
        code = errno.errorcode.get(error.errno, "") if error.errno else ""
        what = f"{error.strerror or error}{f' ({code})' if code else ''} writing {file}"
        fix = ("free space there (or set checkpoint.save / --save to a file system with room)"
               if error.errno in (errno.ENOSPC, errno.EDQUOT) else "fix the cause")
    saved = saved_iteration(directory)
    if saved is None:
        return (f"saving the checkpoint of iteration {iteration} into {directory} failed: {what}; no checkpoint "
                f"was saved there before; {fix}, then the same command starts the run again")
    return (f"saving the checkpoint of iteration {iteration} into {directory} failed: {what}; the last good "
            f"checkpoint is iteration {saved} in {directory}; {fix}, then the same command resumes from it")
