"""Greedy decoding and exact-match accuracy, for tasks whose answer is a short text.

The model is any function ``logits_of(tokens int64 [b, t]) -> logits [b, t, V]`` (float, any
device); at this size re-running the full prefix for every new token is cheap enough, so no KV
cache is kept. Prompts of equal length are decoded together, so no padding enters the model.
"""

from collections import defaultdict
from collections.abc import Callable, Collection, Sequence

import torch

from ..progress import Progress


def greedy_generate(logits_of: Callable[[torch.Tensor], torch.Tensor], prompts: Sequence[Sequence[int]],
                    max_new_tokens: int, stop_ids: Collection[int], batch_size: int = 64) -> list[list[int]]:
    """Per prompt (token ids, at least one), the tokens chosen greedily after it (argmax of the last
    position's logits, ties to the lowest id) up to, not including, the first of ``stop_ids``, at
    most ``max_new_tokens``. Prompts of one length go through ``logits_of`` together, at most
    ``batch_size`` at a time. Rank 0 prints the progress through ``len(prompts) x max_new_tokens``
    token slots (a prompt that stops early fills its remaining ones) and the generated tokens per
    second (:class:`megatron_qad.progress.Progress`)."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be >= 1")
    by_length = defaultdict(list)
    for index, prompt in enumerate(prompts):
        if not len(prompt):
            raise ValueError(f"prompt {index} is empty; a prompt needs at least one token")
        by_length[len(prompt)].append(index)
    outputs: list[list[int]] = [[] for _ in prompts]
    progress = Progress("greedy generation", len(prompts) * max_new_tokens, unit="token slots")
    for indices in by_length.values():
        for first in range(0, len(indices), batch_size):
            rows = indices[first:first + batch_size]
            for row, tokens in zip(rows, _decode(logits_of, [prompts[i] for i in rows], max_new_tokens, stop_ids,
                                                 progress)):
                outputs[row] = tokens
    return outputs


def _decode(logits_of, prompts, max_new_tokens: int, stop_ids: Collection[int], progress: Progress) -> list[list[int]]:
    """:func:`greedy_generate` for prompts of one length."""
    tokens = torch.tensor([list(prompt) for prompt in prompts], dtype=torch.int64)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.int64)
    stopped = torch.zeros(len(prompts), dtype=torch.bool)
    with torch.no_grad():
        for step in range(max_new_tokens):
            chosen = logits_of(tokens)[:, -1].float().argmax(dim=-1).cpu()
            tokens = torch.cat([tokens, chosen[:, None]], dim=1)
            stopped |= torch.isin(chosen, stops)
            if stopped.all():
                progress.advance(len(prompts) * (max_new_tokens - step), tokens=len(prompts))
                break
            progress.advance(len(prompts))
    generated = tokens[:, len(prompts[0]):].tolist()
    return [_until_stop(row, stop_ids) for row in generated]


def _until_stop(tokens: list[int], stop_ids: Collection[int]) -> list[int]:
    for position, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:position]
    return tokens


def exact_match(completions: Sequence[str], answers: Sequence[str]) -> float:
    """The fraction of ``completions`` equal, character for character, to their ``answers``."""
    if len(completions) != len(answers) or not answers:
        raise ValueError(f"need as many completions ({len(completions)}) as answers ({len(answers)}), at least one")
    return sum(completion == answer for completion, answer in zip(completions, answers)) / len(answers)
