"""``build_dataset``: the dataset of a split of the recipe's ``data.sources``."""

import os

from ..config import ConfigError
from .chat import chat_stream
from .documents import corpus_documents, jsonl_documents, text_documents, token_stream
from .indexed import indexed_stream
from .mixture import Mixture
from .random_tokens import RandomTokens
from .seeds import derive_seed
from .sources import validate_sources, with_defaults
from .splits import HELD_OUT_EVERY, check_split, split_positions
from .tasks import arithmetic_documents
from .teacher_answers import answer_documents
from .teacher_generated import TeacherSequences, teacher_sequences
from .tokenizers import ByteTokenizer, load_tokenizer
from .windows import ArrayStream, TokenWindows


def build_dataset(sources: list[dict], split: str, seq_length: int, vocab_size: int, seed: int,
                  cache_dir: str | None = None, teacher_sampler=None):
    """The ``split`` ("train" or "validation") of the mixture of ``sources`` (``data.sources``).

    ``seq_length`` is in tokens, ``vocab_size`` the model's (``model.vocab_size``); ``seed`` fixes
    every random choice (random tokens, window order, teacher sampling). ``cache_dir`` holds the
    caches of teacher_generated and teacher_answers sources that set no ``cache``;
    ``teacher_sampler(prefix int64 [b, t]) -> logits [b, t, vocab_size]`` samples those that have
    no valid cache.

    Returns a dataset with ``len(ds)`` (distinct samples) and ``ds[i]`` for any ``i >= 0``: a dict of
    ``tokens`` int64 ``[seq_length]``, ``labels`` int64 ``[seq_length]`` (the next tokens) and
    ``loss_mask`` float32 ``[seq_length]``. The same arguments give bit-identical samples in any
    process. One source is returned as its own dataset, several as a
    :class:`~megatron_qad.data.mixture.Mixture`.
    """
    validate_sources(sources, vocab_size)
    check_split(split)
    if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length < 1:
        raise ConfigError(f"'model.seq_length': must be a positive integer, got {seq_length!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    specs = [with_defaults(spec) for spec in sources]
    datasets = [_build_source(spec, index, split, seq_length, vocab_size, seed, cache_dir, teacher_sampler)
                for index, spec in enumerate(specs)]
    if len(datasets) == 1:
        return datasets[0]
    return Mixture(datasets, [spec["weight"] for spec in specs],
                   [f"data.sources[{index}].weight" for index in range(len(specs))])


def _cache_path(spec: dict, index: int, cache_dir: str | None) -> str | None:
    """Where a generated source's samples are cached: its ``cache``, else ``cache_dir/TYPE_INDEX.pt``."""
    if spec["cache"] is not None:
        return os.path.expanduser(spec["cache"])
    return os.path.join(cache_dir, f"{spec['type']}_{index}.pt") if cache_dir is not None else None


def _build_source(spec: dict, index: int, split: str, seq_length: int, vocab_size: int, seed: int,
                  cache_dir: str | None, teacher_sampler):
    where, kind = f"data.sources[{index}]", spec["type"]
    if kind == "random":
        return RandomTokens(seq_length, vocab_size, seed, split, index)
    if kind == "teacher_generated":
        return TeacherSequences(teacher_sequences(spec, where, seq_length, vocab_size, seed,
                                                  _cache_path(spec, index, cache_dir), teacher_sampler), split)
    if kind == "teacher_answers":
        tokens, documents = answer_documents(spec, where, vocab_size, seed, _cache_path(spec, index, cache_dir),
                                             teacher_sampler, split)
        stream = ArrayStream(tokens)
    elif kind == "chat":
        tokens, label_mask, documents = chat_stream(spec, where, split)
        stream = ArrayStream(tokens, label_mask)
    elif kind == "indexed":
        stream, documents = indexed_stream(spec["path_prefix"], split, vocab_size, f"{where}.path_prefix")
    else:
        if kind == "corpus":
            named_texts, tokenizer = corpus_documents(split, spec["max_files"]), ByteTokenizer()
        elif kind == "arithmetic":
            named_texts, tokenizer = arithmetic_documents(spec, split), ByteTokenizer()
        elif kind == "text":
            named_texts = text_documents(spec["paths"], split, f"{where}.paths")
            tokenizer = load_tokenizer(spec["tokenizer"], f"{where}.tokenizer")
        else:
            records = jsonl_documents(spec["paths"], spec["field"], f"{where}.paths", f"{where}.field")
            named_texts = [records[position] for position in split_positions(len(records), split)]
            tokenizer = load_tokenizer(spec["tokenizer"], f"{where}.tokenizer")
        documents = [name for name, _ in named_texts]
        stream = ArrayStream(token_stream([text for _, text in named_texts], tokenizer))
    if len(stream) < 2:
        raise ConfigError(f"'{where}': the {split!r} split has {len(documents)} documents and {len(stream)} "
                          f"tokens, too few for one sample; documents at positions 0, {HELD_OUT_EVERY}, "
                          f"{2 * HELD_OUT_EVERY}, ... form the validation split and the rest train: add documents")
    return TokenWindows(stream, seq_length, derive_seed(seed, "windows", index, split), documents)
