"""Sequences sampled from the teacher at temperature 1, generated once and cached on disk.

Sequence ``i`` starts with the tokenizer's BOS token, followed (when prompts are given) by the
tokens of prompt ``i % num_prompts`` (cut so at least one token is generated), and continues with
tokens sampled from the teacher's softmax until it holds ``seq_length + 1`` tokens. Each sequence
draws from its own generator, seeded from ``(seed, i)``, so it does not depend on the batch size.
Positions ``0, 50, 100, ...`` form the validation split, the rest train; both come from one
generation and one cache file.

The cache stores ``{"fingerprint": ..., "sequences": int64 [num_sequences, seq_length + 1]}`` and is
reused when the fingerprint (seed, num_sequences, seq_length, vocab_size and a hash of the start
tokens) matches. The teacher itself is not part of it: delete the cache after changing the teacher.
"""

import hashlib
import json
import os
import socket

import torch

from ..config import ConfigError
from ..progress import Progress
from .documents import jsonl_documents
from .samples import make_sample, wrapped_index
from .seeds import generator
from .splits import split_positions
from .tokenizers import load_tokenizer


class TeacherSequences:
    """Dataset of the rows of ``sequences`` (int64 ``[n, seq_length + 1]``) that belong to ``split``."""

    def __init__(self, sequences: torch.Tensor, split: str):
        self.sequences = sequences[split_positions(len(sequences), split)]
        self.seq_length = sequences.shape[1] - 1

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index) -> dict[str, torch.Tensor]:
        return make_sample(self.sequences[wrapped_index(index, len(self))], self.seq_length)


def teacher_sequences(spec: dict, where: str, seq_length: int, vocab_size: int, seed: int,
                      cache_path: str | None, teacher_sampler) -> torch.Tensor:
    """int64 ``[num_sequences, seq_length + 1]``: the cached sequences of source ``spec`` (recipe key
    ``where``, defaults filled in) when ``cache_path`` holds a matching cache, otherwise generated with
    ``teacher_sampler`` and written to ``cache_path`` (None: not cached)."""
    starts = start_tokens(spec, where, seq_length)
    fingerprint = dict(seed=int(seed), num_sequences=spec["num_sequences"], seq_length=seq_length,
                       vocab_size=vocab_size,
                       start_tokens=hashlib.blake2b(json.dumps(starts).encode(), digest_size=16).hexdigest())
    return cached_or_sampled(teacher_sampler, starts, seq_length, vocab_size, seed, spec["batch_size"], cache_path,
                             fingerprint, where, "a teacher_generated source needs the teacher to sample its sequences")


def cached_or_sampled(teacher_sampler, starts: list[list[int]], seq_length: int, vocab_size: int, seed: int,
                      batch_size: int, cache_path: str | None, fingerprint: dict, where: str,
                      need: str) -> torch.Tensor:
    """int64 ``[len(starts), seq_length + 1]``: the cache at ``cache_path`` when it was written with
    ``fingerprint``, else ``starts`` continued by :func:`generate` and cached there. Without a
    cache and a ``teacher_sampler`` a ValueError names ``where`` and says ``need``."""
    cached = load_cache(cache_path, fingerprint)
    if cached is not None:
        return cached
    if teacher_sampler is None:
        found = "no cache path is set" if cache_path is None else f"no cache at {cache_path!r} matches {fingerprint}"
        raise ValueError(f"'{where}': {need} and {found}; build the dataset with teacher_sampler, or point "
                         f"{where}.cache at a cache generated with these settings")
    sequences = generate(teacher_sampler, starts, seq_length, vocab_size, seed, batch_size, where)
    if cache_path is not None:
        save_cache(cache_path, fingerprint, sequences)
    return sequences


def start_tokens(spec: dict, where: str, seq_length: int) -> list[list[int]]:
    """Per sequence, the tokens it starts with: BOS, then its prompt's tokens, at most ``seq_length``."""
    tokenizer = load_tokenizer(spec["tokenizer"], f"{where}.tokenizer")
    if spec["prompts"] is None:
        return [[tokenizer.bos_id]] * spec["num_sequences"]
    prompts = [text for _, text in jsonl_documents(spec["prompts"], spec["field"], f"{where}.prompts",
                                                   f"{where}.field")]
    if not prompts:
        raise ConfigError(f"'{where}.prompts': the files hold no prompt (every line is blank); add prompts or "
                          f"remove the key to start every sequence from BOS")
    return [([tokenizer.bos_id] + tokenizer.encode(prompts[i % len(prompts)]))[:seq_length]
            for i in range(spec["num_sequences"])]


def generate(teacher_sampler, starts: list[list[int]], seq_length: int, vocab_size: int, seed: int,
             batch_size: int, where: str) -> torch.Tensor:
    """int64 ``[len(starts), seq_length + 1]``: ``starts`` continued by sampling at temperature 1.

    ``teacher_sampler(prefix)`` maps int64 ``[b, t]`` token ids to logits ``[b, t, vocab_size]`` (any
    float dtype and device); it is called under ``torch.no_grad`` with ``b <= batch_size``
    sequences and ``t`` growing by one per call. Sampling runs on the CPU in float32. Rank 0 prints
    the progress in sampled tokens (:class:`megatron_qad.progress.Progress`).
    """
    length = seq_length + 1
    sequences = torch.zeros(len(starts), length, dtype=torch.int64)
    progress = Progress(f"'{where}': teacher generation", sum(length - len(start) for start in starts))
    with torch.no_grad():
        for first in range(0, len(starts), batch_size):
            rows = range(first, min(first + batch_size, len(starts)))
            batch = sequences[first:rows.stop]
            for row in rows:
                batch[row - first, :len(starts[row])] = torch.tensor(starts[row], dtype=torch.int64)
            generators = [generator(seed, "teacher_generated", row) for row in rows]
            for position in range(min(len(starts[row]) for row in rows), length):
                logits = teacher_sampler(batch[:, :position].clone())
                if tuple(logits.shape) != (len(rows), position, vocab_size):
                    raise ValueError(f"'{where}': teacher_sampler returned logits of shape {tuple(logits.shape)} "
                                     f"for a prefix of {len(rows)} x {position} tokens; expected [batch, tokens, "
                                     f"vocab_size] = {(len(rows), position, vocab_size)}")
                probs = torch.softmax(logits[:, -1].detach().float().cpu(), dim=-1)
                if not torch.isfinite(probs).all():
                    raise ValueError(f"'{where}': teacher_sampler returned logits that are not finite")
                sampled = [offset for offset, row in enumerate(rows) if position >= len(starts[row])]
                for offset in sampled:
                    batch[offset, position] = torch.multinomial(probs[offset], 1, generator=generators[offset])
                progress.advance(len(sampled))
    return sequences


def load_cache(path: str | None, fingerprint: dict) -> torch.Tensor | None:
    """The sequences cached at ``path`` if that file exists and was written with ``fingerprint``, else None."""
    if path is None or not os.path.isfile(path):
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return saved["sequences"] if saved.get("fingerprint") == fingerprint else None


def save_cache(path: str, fingerprint: dict, sequences: torch.Tensor) -> None:
    """Write ``sequences`` and ``fingerprint`` to ``path`` atomically: to a file private to this process
    (named by host and process id, so ranks sharing a file system never collide), then renamed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
    torch.save({"fingerprint": fingerprint, "sequences": sequences}, temporary)
    os.replace(temporary, path)
