"""One training sample: ``tokens``, the next-token ``labels`` and the ``loss_mask`` of a token window."""

import operator

import torch

PAD_ID = 0
"""Token id filling the end of a window shorter than ``seq_length + 1`` (its loss_mask is 0)."""


def make_sample(window: torch.Tensor, seq_length: int) -> dict[str, torch.Tensor]:
    """The sample of a window of ``n`` consecutive tokens, ``2 <= n <= seq_length + 1`` (int64 ``[n]``).

    Returns ``tokens`` int64 ``[s]`` (the window without its last token, padded with :data:`PAD_ID`),
    ``labels`` int64 ``[s]`` (``labels[t]`` is the token after ``tokens[t]``) and ``loss_mask``
    float32 ``[s]``: 1.0 where ``labels[t]`` is a real token of the window, 0.0 in the padding.
    """
    count = window.numel()
    padded = torch.full((seq_length + 1,), PAD_ID, dtype=torch.int64)
    padded[:count] = window.to(torch.int64)
    loss_mask = (torch.arange(seq_length) < count - 1).to(torch.float32)
    return dict(tokens=padded[:-1].clone(), labels=padded[1:].clone(), loss_mask=loss_mask)


def wrapped_index(index, length: int) -> int:
    """``index % length`` for an integer ``index >= 0``: datasets repeat so any step can be read."""
    index = operator.index(index)
    if index < 0:
        raise IndexError(f"sample index must be >= 0, got {index}")
    return index % length
