"""The end of a run, for a person and for a program.

A run's summary (the dict :func:`megatron_qad.train.megatron.run_pretrain` returns) goes, whole,
to its record file (:func:`record_path`, written atomically by
:func:`megatron_qad.train.arguments.write_summary`); the console gets :func:`short_line`, one
``summary {...}`` JSON line with the headline figures and the record's path, then
:func:`human_lines`:

    trained: 100 iterations, 51,200 tokens in 1 min 12 s
                              PTQ         trained     change
      KL(teacher || student)  7.912e-04   3.210e-04   -59.4 %
      student cross entropy   2.9340      2.9331      -0.0 %
      top-1 agreement         96.81%      97.90%      +1.1 %
    student: runs/tiny_cpu/qad (Megatron-LM checkpoint, iteration 100)
    record: runs/tiny_cpu/qad/summary.json (every iteration's metrics); Megatron's output: ...

and the front door adds the commands to run next (:func:`next_lines`):

    next: megatron-qad eval configs/tiny_cpu.yaml    # the trained student against the teacher, ...
          megatron-qad export configs/tiny_cpu.yaml  # the NVFP4 Hugging Face checkpoint
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from ..progress import duration

SHORT_KEYS = ("mode", "kl_reduction", "seconds", "stopped_at", "exit_code", "record")
"""The summary's keys :func:`short_line` keeps (those present)."""

ROWS = (("KL(teacher || student)", "kl", "{:.3e}"), ("student cross entropy", "student ce", "{:.4f}"),
        ("top-1 agreement", "top1 agreement", "{:.2%}"))
"""The table's rows: label, metric, format."""

TITLES = {"train": "trained", "ptq": "PTQ (calibration and evaluation)", "eval": "evaluation of the student",
          "teacher": "teacher trained"}

NEXT = {"train": (("eval", "the trained student against the teacher, with every layer's weight error"),
                  ("export", "the NVFP4 Hugging Face checkpoint")),
        "ptq": (("train", "QAD from this PTQ baseline"), ("export", "the PTQ student as an NVFP4 Hugging Face checkpoint")),
        "eval": (("export", "the NVFP4 Hugging Face checkpoint"),)}
"""Per ``megatron-qad`` command, the commands that usually follow it, and what they give."""


def record_path(args: argparse.Namespace) -> str | None:
    """Where a QAD run's record goes: ``--qad-summary``, else ``--qad-eval-report`` (the eval's
    report, completed), else ``SAVE/summary.json`` (``SAVE/ptq_summary.json`` for
    ``--qad-command ptq``) with ``--save``; None otherwise (and for a teacher's run)."""
    if args.qad_summary:
        return args.qad_summary
    if args.qad_mode != "qad":
        return None
    if args.qad_eval_report:
        return args.qad_eval_report
    if args.save:
        return str(Path(args.save) / ("ptq_summary.json" if args.qad_command == "ptq" else "summary.json"))
    return None


def short_line(summary: dict) -> str:
    """``summary {...}``: the keys of :data:`SHORT_KEYS` that ``summary`` has, as one JSON line."""
    return "summary " + json.dumps({key: summary[key] for key in SHORT_KEYS if key in summary}, sort_keys=True)


def _change(before: float, after: float) -> str:
    return f"{100 * (after - before) / before:+.1f} %" if before else "-"


def _table(columns: list[tuple[str, dict]]) -> list[str]:
    """The metrics of each ``(heading, metrics)`` column, and the relative change of the last
    against the first when there are two."""
    headings = [heading for heading, _ in columns] + (["change"] if len(columns) == 2 else [])
    lines = [f"  {'':<24}" + "".join(f"{heading:<12}" for heading in headings).rstrip()]
    for label, metric, fmt in ROWS:
        values = [metrics.get(metric) for _, metrics in columns]
        if any(value is None for value in values):
            continue
        cells = [fmt.format(value) for value in values]
        if len(values) == 2:
            cells.append(_change(*values))
        lines.append(f"  {label:<24}" + "".join(f"{cell:<12}" for cell in cells).rstrip())
    return lines


def human_lines(summary: dict) -> list[str]:
    """What a person reads at the end of the run ``summary`` (see the module docstring)."""
    mode = summary["mode"]
    trained = len(summary.get("train") or [])
    done = f": {trained} iteration{'s' * (trained > 1)}, {summary.get('tokens', 0):,} tokens" if trained else ""
    head = f"{TITLES[mode]}{done} in {duration(summary['seconds'])}"
    if "stopped_at" in summary:
        head += f", stopped at iteration {summary['stopped_at']} (exit code {summary.get('exit_code', 0)})"
    lines = [head]
    ptq, final = summary.get("ptq"), summary.get("final")
    columns = [(heading, metrics) for heading, metrics in (("PTQ", ptq), ("trained" if mode == "train" else "student", final))
               if metrics]
    if columns:
        lines += _table(columns)
    if mode == "teacher" and trained:
        curve = summary["train"]
        lines[0] += f"; cross entropy {curve[0]['loss']:.3f} -> {curve[-1]['loss']:.3f}"
    if summary.get("checkpoint"):
        checkpoint = summary["checkpoint"]
        kind = f"Megatron-LM checkpoint, iteration {checkpoint['iteration']}" if checkpoint.get("iteration") else \
            "dist checkpoint"
        lines.append(f"{'teacher' if mode == 'teacher' else 'student'}: {checkpoint['dir']} ({kind})")
    where = []
    if summary.get("record"):
        where.append(f"record: {summary['record']} (every iteration's metrics)")
    if summary.get("log"):
        where.append(f"Megatron's output: {summary['log']}")
    if where:
        lines.append("; ".join(where))
    return lines


def next_lines(mode: str, command: Callable[[str], str]) -> list[str]:
    """The commands that usually follow a finished ``mode`` run: ``command(name)`` is the command
    line of ``megatron-qad name`` for this run."""
    steps = NEXT.get(mode, ())
    width = max((len(command(name)) for name, _ in steps), default=0)
    return [f"{'next:' if index == 0 else '':<6}{command(name):<{width}}  # {what}"
            for index, (name, what) in enumerate(steps)]
