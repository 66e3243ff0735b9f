"""Whether a teacher this package trains (``--qad-mode teacher``) is finished.

A teacher run marks its ``--save`` directory ``qad_teacher.json`` = ``{"status": "training", ...}``
when it starts and ``"finished"`` once Megatron's loop has run all its iterations and saved the
last one (each written atomically). A run stopped on the way (Ctrl-C, the time limit) leaves
"training": the recipe door then resumes the teacher's training to ``teacher.pretrain_iters``
(:func:`megatron_qad.train.preflight.check_teacher_checkpoint`), and no run distils from it. A
directory without the file is a checkpoint from elsewhere and loads as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic_files import write_text
from ..checkpoint_tracker import saved_iteration
from ..config import ConfigError

MARKER = "qad_teacher.json"


def mark(directory: str | Path, status: str, train_iters: int) -> None:
    """Write ``status`` ("training" or "finished") of the teacher of ``train_iters`` iterations
    trained into ``directory`` (rank 0; atomic)."""
    write_text(Path(directory) / MARKER, json.dumps({"status": status, "train_iters": train_iters}) + "\n")


def unfinished(directory: str | Path | None) -> dict | None:
    """The marker of a teacher whose training in ``directory`` began and did not finish; None for
    a finished teacher or a directory without a marker."""
    path = Path(directory) / MARKER if directory else None
    if path is None or not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"{path} cannot be read: the teacher in {directory} is not known to be finished; "
                          f"train it again in a new directory") from None
    return marker if marker.get("status") != "finished" else None


def check_finished(directory: str | Path | None, name: str) -> None:
    """ConfigError naming ``name`` (the setting that gave ``directory``, as messages name it) when
    the teacher there is one whose training stopped before its last iteration."""
    marker = unfinished(directory)
    if marker is None:
        return
    done = saved_iteration(directory) or 0
    raise ConfigError(f"{name} is a teacher whose training stopped at iteration {done} of "
                      f"{marker.get('train_iters')}: no run distils from a half-trained teacher; resume its "
                      f"training first (the command that trained it, with --load {directory}), or give a "
                      f"finished teacher")
