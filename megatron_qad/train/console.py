"""A quiet console: Megatron's own output goes to a log file, the console keeps what a person reads.

    with megatron_output(log_path):   # log_path None: the block prints as it would
        validate_args(args)           # Megatron's argument table: the log only
        pretrain(...)                 # setup, memory reports, INFO lines: the log only

In the block every line written to stdout (``print`` and Megatron's logging handlers that write
there) is appended to the log file, which is created, with its directory, when the first line
comes (``log_path`` on rank 0; ``NAME.rankN.log`` beside it on rank N > 0). The console gets:

* the lines the package prints (written from code in ``megatron_qad``: the teacher and
  quantization lines, PTQ and final validation, progress, divergence and stop messages);
* Megatron's iteration lines (``iteration N/ M | ...``) and validation lines;
* any line naming an error (``...Error``, ``ERROR``).

stderr (warnings, tracebacks) is untouched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from pathlib import Path
from typing import TextIO

SHOWN = re.compile(r"\biteration\s+\d+/\s*\d+ \||validation loss at|Error\b|ERROR")
"""Megatron's lines that stay on the console: iteration and validation lines, errors."""

PACKAGE = __name__.split(".")[0]


class _QuietStdout:
    """stdout in the block: every line to the log, the lines described in the module docstring
    to ``console`` as well (whole lines only)."""

    def __init__(self, console: TextIO, log_path: Path):
        self.console, self.log_path = console, log_path
        self._log: TextIO | None = None
        self._line, self._from_package = "", False

    def write(self, text: str) -> int:
        if not text:
            return 0
        if self._log is None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "a", encoding="utf-8")
        self._log.write(text)
        caller = sys._getframe(1).f_globals.get("__name__", "")  # print() -> the code that printed
        from_package = caller == PACKAGE or caller.startswith(PACKAGE + ".")
        *lines, self._line = (self._line + text).split("\n")
        for line in lines:
            if self._from_package or from_package or SHOWN.search(line):
                self.console.write(line + "\n")
            self._from_package = False
        if self._line:  # an unfinished line: shown if any of its parts came from the package
            self._from_package |= from_package
        return len(text)

    def flush(self) -> None:
        self.console.flush()
        if self._log is not None:
            self._log.flush()

    def close_log(self) -> None:
        if self._line:
            self.write("\n")
        if self._log is not None:
            self._log.close()

    def __getattr__(self, name):  # encoding, isatty, fileno, ...: the console's
        return getattr(self.console, name)


def rank_log(log_path: str | Path) -> Path:
    """This rank's log file: ``log_path`` on rank 0 (``RANK`` unset: 0), ``NAME.rankN.SUFFIX`` on rank N."""
    path, rank = Path(log_path), int(os.environ.get("RANK", "0"))
    return path if rank == 0 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


@contextlib.contextmanager
def megatron_output(log_path: str | Path | None):
    """Quiet the console for the block (see the module docstring); ``None``: change nothing."""
    if log_path is None:
        yield
        return
    console = sys.stdout
    quiet = _QuietStdout(console, rank_log(log_path))
    handlers = [handler for handler in logging.getLogger().handlers
                if isinstance(handler, logging.StreamHandler) and handler.stream in (console, sys.__stdout__)]
    streams = [handler.setStream(quiet) for handler in handlers]
    sys.stdout = quiet
    try:
        yield
    finally:
        sys.stdout = console
        for handler, stream in zip(handlers, streams):
            handler.setStream(stream)
        quiet.close_log()
