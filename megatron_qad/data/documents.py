"""Documents of the text sources, as ``(name, text)`` pairs in a fixed order, and their token stream.

- corpus: the shipped corpus files (``corpus/``), in the order of their ``SHA256SUMS``.
- text: one document per file, files sorted by path.
- jsonl: one document per non-blank line (the string at ``field``), files sorted by path.
"""

import hashlib
import json
from pathlib import Path

import numpy as np

from ..config import ConfigError
from .sources import expand_globs
from .splits import split_positions

CORPUS_DIR = Path(__file__).with_name("corpus")
"""The shipped text corpus: 109 CPython 3.12.1 standard-library files and their ``SHA256SUMS``
(see ``corpus/README.md`` for the selection and the licence)."""


def corpus_files(directory: Path = CORPUS_DIR) -> list[str]:
    """The names of the corpus files in ``directory``, in document order (the lines of its ``SHA256SUMS``)."""
    return [name for _, name in _corpus_entries(directory)]


def _corpus_entries(directory: Path) -> list[tuple[str, str]]:
    """``(sha256 hex digest, file name)`` per line of ``directory/SHA256SUMS``."""
    try:
        lines = (directory / "SHA256SUMS").read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ConfigError(f"the text corpus at {directory} is missing ({error}); reinstall megatron-qad") from None
    return [tuple(line.split(maxsplit=1)) for line in lines]


def corpus_documents(split: str, max_files: int | None, directory: Path = CORPUS_DIR) -> list[tuple[str, str]]:
    """The corpus files of ``split`` (by position in :func:`corpus_files`), at most ``max_files`` of
    them (None: all), each ``(name, text)``. A file whose bytes differ from its SHA-256 in
    ``SHA256SUMS``, or that is missing, raises ConfigError naming it: the corpus is the same on
    every machine or not used at all."""
    entries = _corpus_entries(directory)
    documents = []
    for position in split_positions(len(entries), split):
        if max_files is not None and len(documents) == max_files:
            break
        digest, name = entries[position]
        try:
            data = (directory / name).read_bytes()
        except OSError as error:
            raise ConfigError(f"the text corpus lacks {name} ({error}); restore it (git checkout) or "
                              f"reinstall megatron-qad") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise ConfigError(f"the text corpus file {directory / name} differs from its SHA-256 in SHA256SUMS "
                              f"(changed line endings?); restore it (git checkout) or reinstall megatron-qad")
        documents.append((name, data.decode("utf-8")))
    return documents


def text_documents(paths, split: str, key: str) -> list[tuple[str, str]]:
    """The files matched by globs ``paths`` (recipe key ``key``) that belong to ``split``, as
    ``(path, text)``; a file that is not UTF-8 text raises ConfigError naming ``key``."""
    files = expand_globs(paths, key)
    documents = []
    for position in split_positions(len(files), split):
        try:
            with open(files[position], encoding="utf-8") as handle:
                documents.append((files[position], handle.read()))
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"'{key}': cannot read {files[position]!r} as UTF-8 text ({error}); "
                              f"fix or exclude the file") from error
    return documents


def jsonl_documents(paths, field: str, paths_key: str, field_key: str) -> list[tuple[str, str]]:
    """Every record of the JSON-lines files matched by ``paths``, as ``("file:line", record[field])``.

    Blank lines are skipped. A line that is not a JSON object with a string at ``field`` raises
    ConfigError naming the file, the line and the recipe key.
    """
    return [(name, record[field]) for name, record in jsonl_records(paths, (field,), paths_key, field_key)]


def jsonl_records(paths, fields: tuple[str, ...], paths_key: str, fields_key: str) -> list[tuple[str, dict]]:
    """Every record of the JSON-lines files matched by ``paths``, as ``("file:line", record)``; each must
    be a JSON object with a string at every one of ``fields`` (else ConfigError naming the file, the
    line and ``fields_key``). Blank lines are skipped."""
    records = []
    for path in expand_globs(paths, paths_key):
        for number, line in _numbered_lines(path, paths_key):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"'{paths_key}': {path}:{number} is not valid JSON ({error}); every "
                                  f"non-blank line must be one JSON object") from error
            missing = [field for field in fields if not isinstance(record, dict) or not isinstance(record.get(field), str)]
            if missing:
                raise ConfigError(f"'{fields_key}': {path}:{number} has no string field {missing[0]!r}; set "
                                  f"{fields_key} to the key that holds the text")
            records.append((f"{path}:{number}", record))
    return records


def _numbered_lines(path: str, key: str):
    """Yield ``(line number, line)`` of UTF-8 text file ``path``; a read error raises ConfigError naming ``key``."""
    try:
        with open(path, encoding="utf-8") as handle:
            yield from enumerate(handle, start=1)
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"'{key}': cannot read {path!r} as UTF-8 text ({error}); fix or exclude the file") from error


def token_stream(texts, tokenizer) -> np.ndarray:
    """int32 ``[n]``: the tokens of every text, each followed by ``tokenizer.eod_id``."""
    eod = np.array([tokenizer.eod_id], dtype=np.int32)
    pieces = [piece for text in texts for piece in (tokenizer.encode_array(text), eod)]
    return np.concatenate(pieces, dtype=np.int32) if pieces else np.zeros(0, dtype=np.int32)
