"""What the result benchmarks (``reproduce_qad.py``, ``real_model.py``) share: their command line's
lists (variants, seeds, learning rates), the processes their runs share a GPU in (``--jobs``), run
directory names, the learning-rate sweep table and the marked section of a Markdown file they write
their tables into."""

import argparse
import multiprocessing
import re
from concurrent.futures import Executor, Future, ProcessPoolExecutor
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
    """An executor that runs each call at once, in this process (``--jobs 1``)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def executor(jobs: int) -> Executor:
    """``jobs`` processes (spawned: each starts its own CUDA context), or this process for 1."""
    if jobs == 1:
        return InProcess()
    return ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))


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
