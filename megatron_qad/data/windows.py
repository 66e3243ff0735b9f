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
    """A token stream held in memory: ``tokens`` is a 1-D integer array. ``label_mask`` (bool, the
    same length, or None for all True) says which tokens count as labels: a window's loss_mask is
    0 where its label is a token with False (e.g. a chat prompt's tokens)."""

    def __init__(self, tokens: np.ndarray, label_mask: np.ndarray | None = None):
        if label_mask is not None and len(label_mask) != len(tokens):
            raise ValueError(f"label_mask has {len(label_mask)} entries for {len(tokens)} tokens")
        self.tokens = tokens
        self.label_mask = label_mask

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
        stop = min(start + self.seq_length + 1, len(self.stream))
        sample = make_sample(torch.from_numpy(np.asarray(self.stream.read(start, stop), dtype=np.int64)),
                             self.seq_length)
        label_mask = getattr(self.stream, "label_mask", None)
        if label_mask is not None:  # the label of position t is stream token start + 1 + t
            labelled = torch.from_numpy(np.asarray(label_mask[start + 1:stop], dtype=np.float32))
            sample["loss_mask"][:len(labelled)] *= labelled
        return sample
