"""Samples cut from one token stream: windows of ``seq_length + 1`` tokens, in a seeded order.

Window ``w`` holds stream tokens ``[w * s, w * s + s + 1)``: consecutive windows share one token,
so every token but the first is a label exactly once. The last window may be shorter; its missing
positions are padding with loss_mask 0. Sample ``i`` is window ``order[i % len]``, where ``order``
is a permutation of the windows drawn from the seed, so neighbouring samples come from all over the
corpus and a dataset repeats (in the same order) after ``len`` samples.
"""

import numpy as np
import torch

from .samples import make_sample, wrapped_index


class ArrayStream:
    """A token stream held in memory: ``tokens`` is a 1-D integer array."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the stream."""
        return self.tokens[start:stop]


class TokenWindows:
    """Dataset of the windows of ``stream`` (any object with ``len()`` in tokens and ``read(start, stop)``).

    ``order_seed`` draws the window order (see the module docstring). ``documents`` names the
    documents the stream was made of, in stream order. ``ds[i]`` is a sample dict of
    :func:`~megatron_qad.data.samples.make_sample` (``[seq_length]`` tensors).
    """

    def __init__(self, stream, seq_length: int, order_seed: int, documents):
        if len(stream) < 2:
            raise ValueError(f"a token stream of {len(stream)} tokens has no next-token pair")
        self.stream = stream
        self.seq_length = seq_length
        self.documents = documents
        num_windows = -(-(len(stream) - 1) // seq_length)
        gen = torch.Generator()
        gen.manual_seed(order_seed)
        self.order = torch.randperm(num_windows, generator=gen).numpy()

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index) -> dict[str, torch.Tensor]:
        start = int(self.order[wrapped_index(index, len(self))]) * self.seq_length
        window = self.stream.read(start, min(start + self.seq_length + 1, len(self.stream)))
        return make_sample(torch.from_numpy(np.asarray(window, dtype=np.int64)), self.seq_length)
