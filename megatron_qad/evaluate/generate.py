"""Greedy decoding and exact-match accuracy, for tasks whose answer is a short text.

The model is any function ``logits_of(tokens int64 [b, t]) -> logits [b, t, V]`` (float, any
device); at this size re-running the full prefix for every new token is cheap enough, so no KV
cache is kept. Prompts of equal length are decoded together, so no padding enters the model.
"""

from collections import defaultdict
from collections.abc import Callable, Collection, Sequence

import torch

from ..progress import Progress
from .chat import greedy_replies


def greedy_generate(logits_of: Callable[[torch.Tensor], torch.Tensor], prompts: Sequence[Sequence[int]],
                    max_new_tokens: int, stop_ids: Collection[int], batch_size: int = 64) -> list[list[int]]:
    """Per prompt (token ids, at least one), the tokens chosen greedily after it (argmax of the last
    position's logits, ties to the lowest id) up to, not including, the first of ``stop_ids``, at
    most ``max_new_tokens``. Prompts of one length go through ``logits_of`` together, at most
    ``batch_size`` at a time (:func:`megatron_qad.evaluate.chat.greedy_replies` with no padding).
    Rank 0 prints the progress through ``len(prompts) x max_new_tokens`` token slots (a prompt that
    stops early fills its remaining ones) and the generated tokens per second."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be >= 1")
    by_length = defaultdict(list)
    for index, prompt in enumerate(prompts):
        if not len(prompt):
            raise ValueError(f"prompt {index} is empty; a prompt needs at least one token")
        by_length[len(prompt)].append(index)
    outputs: list[list[int]] = [[] for _ in prompts]
    progress = Progress("greedy generation", len(prompts) * max_new_tokens, unit="token slots")
    for rows in by_length.values():
        # Rows of one length grow together, so no row is ever padded.
        replies = greedy_replies(lambda tokens, padding: logits_of(tokens), [prompts[row] for row in rows],
                                 max_new_tokens, stop_ids, batch_size, progress=progress)
        for row, reply in zip(rows, replies):
            outputs[row] = reply[:-1] if reply and reply[-1] in stop_ids else reply
    return outputs


def exact_match(completions: Sequence[str], answers: Sequence[str]) -> float:
    """The fraction of ``completions`` equal, character for character, to their ``answers``."""
    if len(completions) != len(answers) or not answers:
        raise ValueError(f"need as many completions ({len(completions)}) as answers ({len(answers)}), at least one")
    return sum(completion == answer for completion, answer in zip(completions, answers)) / len(answers)
