"""Megatron-LM's tracker file: the file in a checkpoint directory (``--save`` / ``checkpoint.save``)
that names its newest complete checkpoint. No Megatron import, so that the launcher can read it.

The strict reader, with one-line errors for a damaged tracker, is
:func:`megatron_qad.train.checkpointing.resolve_checkpoint`; :func:`saved_iteration` is the lenient
one, for decisions and messages about a run that may have saved nothing yet.
"""

from __future__ import annotations

from pathlib import Path

MEGATRON_LATEST = "latest_checkpointed_iteration.txt"
"""The file naming a Megatron-LM checkpoint directory's newest iteration ("release" or a number)."""


def has_tracker(directory: str | Path | None) -> bool:
    """Whether ``directory`` is a Megatron-LM checkpoint directory: it holds the tracker file
    (whatever the file says)."""
    return bool(directory) and (Path(directory) / MEGATRON_LATEST).is_file()


def saved_iteration(directory: str | Path | None) -> int | None:
    """The iteration of the newest checkpoint in ``directory``, as its tracker file names it; None
    without a directory, without a readable tracker, or with a ``release`` one (which no training
    resumes)."""
    try:
        text = (Path(directory) / MEGATRON_LATEST).read_text().strip() if directory else ""
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None
