"""The teacher's answers to a task's prompts: a teacher's generations, or rejection sampling's data.

A ``teacher_answers`` source names an ``arithmetic`` source (``task``) and takes the prompts of its
first ``num_prompts`` training problems (:func:`.tasks.asked_and_context`). The teacher continues each
prompt (after the task's prompt context, :func:`.tasks.answer_prompts`) by sampling at temperature 1
(:func:`.teacher_generated.generate`: one generator per prompt, seeded from ``(seed, i)``) until a
newline or end-of-document token, at most ``answer length + 1`` tokens. Document ``i`` is prompt
``i`` followed by what the teacher wrote (its newline included; not the context). ``keep``:

- ``all``: every prompt's document: the teacher's behaviour on the task's prompts, e.g. QAD data;
- ``correct``: only the documents whose answer is the problem's correct answer (whatever the task's
  labels say): rejection-sampling fine-tuning, the reward being exact match.

The kept documents are numbered in prompt order and split like any source (every 50th held out).
The sampled sequences are cached like :mod:`.teacher_generated`'s (one generation for both splits;
delete the cache after changing the teacher).
"""

import hashlib
import json

import numpy as np

from ..progress import say
from .sources import with_defaults
from .splits import split_positions
from .tasks import END_OF_ANSWER, answer_prompts, asked_and_context, source_problems
from .teacher_generated import cached_or_sampled
from .tokenizers import ByteTokenizer

TOKENIZER = ByteTokenizer()
"""The arithmetic task's tokenizer."""


def answer_documents(spec: dict, where: str, vocab_size: int, seed: int, cache_path: str | None,
                     teacher_sampler, split: str) -> tuple[np.ndarray, list[str]]:
    """``(token stream int32 [n], document names)`` of ``split`` of the ``teacher_answers`` source
    ``spec`` (recipe key ``where``, defaults filled in): the kept documents, each followed by the
    end-of-document token. ``teacher_sampler`` and ``cache_path`` as for
    :func:`.teacher_generated.teacher_sequences`."""
    task = with_defaults(spec["task"])
    asked, context = asked_and_context(source_problems(task), task["prompt_context"])
    problems = asked[:spec["num_prompts"]]
    starts = answer_prompts(context, problems, TOKENIZER)
    length = max(map(len, starts)) + max(len(problem.answer) for problem in problems) + 1
    sequences = _sampled(spec, where, starts, length, vocab_size, seed, cache_path, teacher_sampler)
    stops = {TOKENIZER.encode(END_OF_ANSWER)[0], TOKENIZER.eod_id}
    documents, names = [], []
    for position, (problem, start, row) in enumerate(zip(problems, starts, sequences.tolist())):
        written = _until_stop(row[len(start):], stops)
        if spec["keep"] == "all" or written == TOKENIZER.encode(problem.answer + END_OF_ANSWER):
            documents.append(TOKENIZER.encode(problem.prompt) + written)
            names.append(f"teacher_answers:{position}")
    if spec["keep"] == "correct" and split == "train":
        say(f"'{where}': {len(documents):,} of {len(problems):,} sampled answers are correct "
            f"({100 * len(documents) / len(problems):.1f} %); those are the data")
    kept = split_positions(len(documents), split)
    pieces = [token for index in kept for token in (*documents[index], TOKENIZER.eod_id)]
    return np.array(pieces, dtype=np.int32), [names[index] for index in kept]


def _sampled(spec: dict, where: str, starts: list[list[int]], length: int, vocab_size: int, seed: int,
             cache_path: str | None, teacher_sampler):
    """int64 ``[len(starts), length]``: the starts continued by the teacher (cached, else sampled)."""
    fingerprint = dict(source="teacher_answers", seed=int(seed), num_prompts=len(starts), length=length,
                       vocab_size=vocab_size,
                       start_tokens=hashlib.blake2b(json.dumps(starts).encode(), digest_size=16).hexdigest())
    return cached_or_sampled(teacher_sampler, starts, length - 1, vocab_size, seed, spec["batch_size"], cache_path,
                             fingerprint, where, "a teacher_answers source needs the teacher to sample its answers")


def _until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    """``tokens`` up to and including the first newline; up to, not including, an end-of-document."""
    for position, token in enumerate(tokens):
        if token in stops:
            return tokens[:position + 1] if token != TOKENIZER.eod_id else tokens[:position]
    return tokens
