"""The train / validation split: every 50th document (positions 0, 50, 100, ...) is held out.

Each source numbers its documents in a fixed order (sorted files, lines in order, Megatron document
indices, generated sequences); position ``p`` belongs to "validation" when ``p % 50 == 0`` and to
"train" otherwise, so the splits are disjoint and the same on every machine.
"""

import numpy as np

SPLITS = ("train", "validation")
HELD_OUT_EVERY = 50


def check_split(split: str) -> str:
    """``split`` itself when it is "train" or "validation"; ValueError otherwise."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(map(repr, SPLITS))}, got {split!r}")
    return split


def split_mask(count: int, split: str) -> np.ndarray:
    """bool ``[count]``: which of the document positions ``0 .. count-1`` belong to ``split``."""
    held_out = np.arange(count) % HELD_OUT_EVERY == 0
    return held_out if check_split(split) == "validation" else ~held_out


def split_positions(count: int, split: str) -> list[int]:
    """The document positions in ``0 .. count-1`` that belong to ``split``, ascending."""
    return np.flatnonzero(split_mask(count, split)).tolist()
