"""A weighted mixture of datasets with a fixed blending schedule, the same in every process.

Like megatron.core's BlendedDataset, the schedule gives each of the first ``BLOCK`` samples to the
source whose achieved count falls furthest below its share (weight / sum of weights) so far; that
block pattern then repeats. Each source is read in its own order through a per-source counter: sample
``i`` is sample ``(i // BLOCK) * per_block[k] + rank`` of source ``k``, where ``rank`` counts the
earlier positions of ``k`` in the block. So any index is computed in O(1), and the sample of an
index depends on nothing but the sources and their weights.
"""

import operator
import sys

import numpy as np
import torch

from ..config import ConfigError

BLOCK = 10_000
"""Samples per repetition of the schedule; a source's share is exact to within 1 / BLOCK."""


class Mixture:
    """Samples of ``datasets`` (each with ``len`` and ``ds[j]`` for any ``j >= 0``) blended by ``weights``.

    ``weight_keys`` are the recipe keys of the weights, named in errors. ``len`` is the number of
    samples before some source starts repeating (capped at ``sys.maxsize``); any index can be read.
    """

    def __init__(self, datasets, weights, weight_keys):
        self.datasets = list(datasets)
        shares = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.schedule = np.empty(BLOCK, dtype=np.int64)
        self.rank = np.empty(BLOCK, dtype=np.int64)
        counts = np.zeros(len(self.datasets), dtype=np.int64)
        for position in range(BLOCK):
            source = int(np.argmax(shares * (position + 1) - counts))
            self.schedule[position], self.rank[position] = source, counts[source]
            counts[source] += 1
        for source, count in enumerate(counts):
            if count == 0:
                raise ConfigError(f"'{weight_keys[source]}': {weights[source]!r} is under 1/{BLOCK} of the total "
                                  f"weight {float(np.sum(weights))!r}, so the source would never be sampled; "
                                  f"raise it or remove the source")
        self.per_block = [int(count) for count in counts]
        self.length = min(sys.maxsize, *(self._first_repeat(source) for source in range(len(self.datasets))))

    def _first_repeat(self, source: int) -> int:
        """The first index that would read sample ``len(dataset)`` of ``source``, i.e. repeat one."""
        blocks, extra = divmod(len(self.datasets[source]), self.per_block[source])
        return blocks * BLOCK + int(np.flatnonzero(self.schedule == source)[extra])

    def __len__(self) -> int:
        return self.length

    def source_of(self, index: int) -> tuple[int, int]:
        """``(k, j)``: sample ``index`` of the mixture is sample ``j`` of ``datasets[k]``."""
        index = operator.index(index)
        if index < 0:
            raise IndexError(f"sample index must be >= 0, got {index}")
        block, position = divmod(index, BLOCK)
        source = int(self.schedule[position])
        return source, block * self.per_block[source] + int(self.rank[position])

    def __getitem__(self, index) -> dict[str, torch.Tensor]:
        source, sample = self.source_of(index)
        return self.datasets[source][sample]
