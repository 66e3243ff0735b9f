"""Markdown pieces the result benchmarks share: the learning-rate sweep table and a file's marked section."""

from collections.abc import Callable, Sequence
from pathlib import Path


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
