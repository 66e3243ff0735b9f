"""How often a run reads each sample of its data, and the two ways data can silently mislead a run.

A dataset repeats without end (any index can be read), so a tiny source trains "normally": two
10-byte text files give one training window of 11 tokens, read again for every sample. Before
training, :func:`repeat_line` says how many times each split's samples are read, and
:func:`check_data_use` refuses, naming the setting that allows it:

- a train split read more than ``data.max_repeats`` times over (the run would memorize it);
- a validation split that is a copy of training data: every one of its in-memory token streams
  occurs, token for token and in order, in a training stream (the same text in a held-out and a
  training document, or a file listed in both ``data.validation_sources`` and ``data.sources``):
  its KL would not measure held-out text (``data.allow_validation_copy``).
"""

from __future__ import annotations

import sys

import numpy as np

from ..config import ConfigError
from .mixture import Mixture
from .windows import ArrayStream, TokenWindows


def repeat_line(train, validation, train_samples: int, validation_samples: int) -> str:
    """One line: how many times the run reads the samples of each split (``train_samples`` /
    ``validation_samples``: what the run reads of ``train`` / ``validation``)."""
    return (f"data: {_repeats('train', len(train), train_samples)}; "
            f"{_repeats('validation', len(validation), validation_samples)}")


def _repeats(split: str, distinct: int, read: int) -> str:
    if distinct >= sys.maxsize:
        return f"the {split} split draws {read} samples that never repeat"
    if read <= distinct:
        return f"the {split} split reads {read} of its {distinct} distinct samples (no repeats)"
    return f"the {split} split reads its {distinct} distinct samples {read / distinct:.3g} times each ({read} samples)"


def check_data_use(train, validation, train_samples: int, max_repeats: int | None, allow_validation_copy: bool,
                   validation_key: str) -> None:
    """Refuse (ConfigError) the uses of the module docstring. ``max_repeats``: ``data.max_repeats``
    (None: no bound); ``validation_key``: the recipe key of the validation data
    (``data.sources`` or ``data.validation_sources``)."""
    if max_repeats is not None and train_samples > max_repeats * len(train):
        raise ConfigError(
            f"'data.sources': the train split has {len(train)} distinct samples and the run reads {train_samples} "
            f"(training.train_iters x training.global_batch_size): each {train_samples / len(train):.3g} times, more "
            f"than data.max_repeats={max_repeats}; add data, lower training.train_iters, or raise data.max_repeats "
            f"(null: no bound)")
    if not allow_validation_copy and _is_copy(validation, train):
        raise ConfigError(
            f"'{validation_key}': the validation split is a copy of training data (all its tokens occur, in order, "
            f"in the train split: the same text in a held-out and a training document, or a file in both "
            f"data.validation_sources and data.sources), so its KL would not measure held-out text; give held-out "
            f"data, or set data.allow_validation_copy=true")


def _is_copy(validation, train) -> bool:
    """Whether every part of ``validation`` is an in-memory token stream found in one of ``train``'s."""
    parts = list(_parts(validation))
    haystacks = [tokens for tokens in _parts(train) if tokens is not None]
    return (bool(parts) and all(part is not None for part in parts)
            and all(any(_contains(haystack, needle) for haystack in haystacks) for needle in parts))


def _parts(dataset):
    """The token arrays of ``dataset``'s sources held in memory; None for any other source."""
    if isinstance(dataset, Mixture):
        for part in dataset.datasets:
            yield from _parts(part)
    elif isinstance(dataset, TokenWindows) and isinstance(dataset.stream, ArrayStream):
        yield dataset.stream.tokens
    else:
        yield None


def _contains(haystack: np.ndarray, needle: np.ndarray) -> bool:
    """Whether token array ``needle`` occurs in ``haystack`` (as consecutive tokens)."""
    if len(needle) > len(haystack):
        return False
    hay, pin = haystack.astype(np.int32).tobytes(), needle.astype(np.int32).tobytes()
    start = hay.find(pin)
    while start != -1 and start % 4:  # a match between token boundaries
        start = hay.find(pin, start + 1)
    return start != -1
