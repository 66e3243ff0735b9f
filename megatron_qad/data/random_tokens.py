"""Uniformly random token ids: a source that needs no data, for smoke tests and throughput runs."""

import sys

import torch

from .samples import make_sample, wrapped_index
from .seeds import generator


class RandomTokens:
    """Sample ``i`` is ``seq_length + 1`` token ids drawn uniformly from ``[0, vocab_size)`` with a
    generator seeded from ``(seed, source_index, split, i)``: it depends on nothing else, and the
    validation split draws from other streams than train. ``len`` is ``sys.maxsize``.
    """

    def __init__(self, seq_length: int, vocab_size: int, seed: int, split: str, source_index: int):
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.stream = (seed, "random", source_index, split)

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index) -> dict[str, torch.Tensor]:
        gen = generator(*self.stream, wrapped_index(index, len(self)))
        window = torch.randint(0, self.vocab_size, (self.seq_length + 1,), generator=gen, dtype=torch.int64)
        return make_sample(window, self.seq_length)
