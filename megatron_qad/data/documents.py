"""Documents of the text sources, as ``(name, text)`` pairs in a fixed order, and their token stream.

- python_stdlib: the ``.py`` files of this interpreter's standard library, sorted by relative path.
- text: one document per file, files sorted by path.
- jsonl: one document per non-blank line (the string at ``field``), files sorted by path.
"""

import json
import os
import sysconfig

import numpy as np

from .sources import expand_globs
from .splits import split_positions

STDLIB_SKIPPED_DIRS = frozenset({"site-packages", "test", "tests"})


def stdlib_root() -> str:
    """The directory of this interpreter's standard library."""
    return sysconfig.get_paths()["stdlib"]


def stdlib_files() -> list[str]:
    """Relative POSIX paths of the standard library's ``.py`` files, sorted, skipping any file under a
    ``site-packages``, ``test`` or ``tests`` directory. Symbolic links to directories are not followed.
    """
    root = stdlib_root()
    files = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = [name for name in subdirectories if name not in STDLIB_SKIPPED_DIRS]
        relative = os.path.relpath(directory, root)
        for name in names:
            if name.endswith(".py"):
                files.append(name if relative == "." else f"{relative.replace(os.sep, '/')}/{name}")
    return sorted(files)


def stdlib_documents(split: str, max_files: int | None) -> list[tuple[str, str]]:
    """The standard-library files of ``split`` (by position in :func:`stdlib_files`), at most
    ``max_files`` of them (None: all), each ``(relative path, text)``. Files that cannot be read as
    UTF-8 are skipped.
    """
    root, files = stdlib_root(), stdlib_files()
    documents = []
    for position in split_positions(len(files), split):
        if max_files is not None and len(documents) == max_files:
            break
        try:
            with open(os.path.join(root, files[position]), encoding="utf-8") as handle:
                documents.append((files[position], handle.read()))
        except (OSError, UnicodeDecodeError):
            continue
    return documents


def text_documents(paths, split: str, key: str) -> list[tuple[str, str]]:
    """The files matched by globs ``paths`` (recipe key ``key``) that belong to ``split``, as
    ``(path, text)``; a file that is not UTF-8 text raises ValueError naming ``key``."""
    files = expand_globs(paths, key)
    documents = []
    for position in split_positions(len(files), split):
        try:
            with open(files[position], encoding="utf-8") as handle:
                documents.append((files[position], handle.read()))
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"'{key}': cannot read {files[position]!r} as UTF-8 text ({error}); "
                             f"fix or exclude the file") from error
    return documents


def jsonl_documents(paths, field: str, paths_key: str, field_key: str) -> list[tuple[str, str]]:
    """Every record of the JSON-lines files matched by ``paths``, as ``("file:line", record[field])``.

    Blank lines are skipped. A line that is not a JSON object with a string at ``field`` raises
    ValueError naming the file, the line and the recipe key.
    """
    documents = []
    for path in expand_globs(paths, paths_key):
        for number, line in _numbered_lines(path, paths_key):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"'{paths_key}': {path}:{number} is not valid JSON ({error}); every "
                                 f"non-blank line must be one JSON object") from error
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise ValueError(f"'{field_key}': {path}:{number} has no string field {field!r}; set "
                                 f"{field_key} to the key that holds the text")
            documents.append((f"{path}:{number}", record[field]))
    return documents


def _numbered_lines(path: str, key: str):
    """Yield ``(line number, line)`` of UTF-8 text file ``path``; a read error raises ValueError naming ``key``."""
    try:
        with open(path, encoding="utf-8") as handle:
            yield from enumerate(handle, start=1)
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"'{key}': cannot read {path!r} as UTF-8 text ({error}); fix or exclude the file") from error


def token_stream(texts, tokenizer) -> np.ndarray:
    """int32 ``[n]``: the tokens of every text, each followed by ``tokenizer.eod_id``."""
    eod = np.array([tokenizer.eod_id], dtype=np.int32)
    pieces = [piece for text in texts for piece in (tokenizer.encode_array(text), eod)]
    return np.concatenate(pieces, dtype=np.int32) if pieces else np.zeros(0, dtype=np.int32)
