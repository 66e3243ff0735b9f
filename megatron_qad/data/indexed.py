"""Token streams read from a Megatron indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``).

Such a dataset holds sequences grouped into documents (``document_indices``), already tokenized
(Megatron's ``preprocess_data.py`` appends the EOD token when asked). The split takes whole
documents by position; their sequences are concatenated as they are, nothing added, and read
lazily from the memory-mapped ``.bin``.
"""

import os

import numpy as np

from ..config import ConfigError
from .splits import split_mask


class IndexedStream:
    """Sequences ``sequence_ids`` (int ``[n]``) of ``dataset`` (a megatron.core IndexedDataset), concatenated.

    Token ids are checked against ``vocab_size`` when read; ``key`` is the recipe key named in errors.
    """

    def __init__(self, dataset, sequence_ids: np.ndarray, vocab_size: int, key: str):
        self.dataset = dataset
        self.sequence_ids = sequence_ids
        self.vocab_size = vocab_size
        self.key = key
        lengths = dataset.sequence_lengths[sequence_ids].astype(np.int64)
        self.starts = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(lengths)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """int64 tokens ``[start, stop)`` of the stream; ConfigError if one is outside ``[0, vocab_size)``."""
        pieces = []
        item = int(np.searchsorted(self.starts, start, side="right")) - 1
        position = start
        while position < stop:
            length = min(stop, int(self.starts[item + 1])) - position
            if length > 0:
                offset = position - int(self.starts[item])
                pieces.append(self.dataset.get(int(self.sequence_ids[item]), offset, length))
            position += length
            item += 1
        tokens = np.concatenate(pieces).astype(np.int64)
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            bad = int(tokens[(tokens < 0) | (tokens >= self.vocab_size)][0])
            raise ConfigError(f"'{self.key}': token id {bad} is outside [0, model.vocab_size = {self.vocab_size}); "
                              f"the dataset was tokenized for another vocabulary: set model.vocab_size to that "
                              f"tokenizer's size or re-tokenize the data")
        return tokens


def indexed_stream(path_prefix: str, split: str, vocab_size: int, key: str) -> tuple[IndexedStream, np.ndarray]:
    """The stream of the documents of ``split`` in the indexed dataset at ``path_prefix`` (recipe key
    ``key``), and those documents' indices (int64 ``[d]``)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = os.path.expanduser(path_prefix)
    dataset = IndexedDataset(prefix, mmap=True)
    bounds = np.asarray(dataset.document_indices, dtype=np.int64)
    in_split = split_mask(len(bounds) - 1, split)
    document_of_sequence = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
    sequence_ids = np.flatnonzero(in_split[document_of_sequence])
    return IndexedStream(dataset, sequence_ids, vocab_size, key), np.flatnonzero(in_split)
