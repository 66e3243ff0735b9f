"""A chat student's replies against its teacher's: greedy agreement and end-of-turn agreement.

Prompts of different lengths are decoded together, padded on the left: a padded row's positions
start at 0 on its first real token and its padding is masked out of attention, so each row computes
what it would alone. (Activations are quantized per token with static scales, so the padding does
not change a real token's quantization either; matrix shapes do change, so a near-tie may round the
other way.) The full prefix is re-run for every new token, without a KV cache; rows that ended their
turn leave the batch.
"""

from collections.abc import Callable, Collection, Sequence

import torch

from ..progress import Progress

PaddedLogits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``logits_of(tokens int64 [b, t], padding int64 [b]) -> logits [b, t, V]``: rows padded on the left
by ``padding[i]`` tokens."""


def padded_inputs(tokens: torch.Tensor, padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(position_ids int64 [b, t], attention_mask bool [b, 1, t, t])`` for left-padded ``tokens``:
    positions count from each row's first real token; the mask (True = forbidden, megatron.core's
    convention) hides later keys and padding keys (a padding query sees itself only)."""
    rows, length = tokens.shape
    columns = torch.arange(length, device=tokens.device)
    pad = padding.to(tokens.device)[:, None]
    positions = (columns[None, :] - pad).clamp(min=0)
    is_pad_key = columns[None, :] < pad  # [b, t]
    mask = columns[None, :] > columns[:, None]  # [t, t]: key after query
    mask = mask[None] | is_pad_key[:, None, :]
    mask &= ~torch.eye(length, dtype=torch.bool, device=tokens.device)[None]
    return positions, mask[:, None]


def megatron_padded_logits(model: torch.nn.Module, device: torch.device) -> PaddedLogits:
    """:data:`PaddedLogits` of a megatron.core GPT model (tensor parallel size 1)."""

    def logits_of(tokens: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(device)
        positions, mask = padded_inputs(tokens, padding)
        with torch.no_grad():
            return model(tokens, positions, mask)

    return logits_of


def _left_padded(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(sequence) for sequence in sequences)
    tokens = torch.full((len(sequences), longest), pad_id, dtype=torch.int64)
    padding = torch.tensor([longest - len(sequence) for sequence in sequences], dtype=torch.int64)
    for row, sequence in enumerate(sequences):
        tokens[row, longest - len(sequence):] = torch.tensor(list(sequence), dtype=torch.int64)
    return tokens, padding


def greedy_replies(logits_of: PaddedLogits, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   stop_ids: Collection[int], batch_size: int = 64, pad_id: int = 0,
                   progress: Progress | None = None) -> list[list[int]]:
    """Per prompt (token ids), the tokens chosen greedily after it (argmax, ties to the lowest id),
    ending with the stop token when the model picks one of ``stop_ids`` within ``max_new_tokens``
    tokens. Rank 0 prints the progress through ``len(prompts) x max_new_tokens`` token slots (a
    reply that ends fills its remaining ones) on ``progress``, or on its own "greedy replies" line."""
    replies: list[list[int]] = [[] for _ in prompts]
    progress = progress or Progress("greedy replies", len(prompts) * max_new_tokens, unit="token slots")
    for first in range(0, len(prompts), batch_size):
        active = list(range(first, min(first + batch_size, len(prompts))))
        for step in range(max_new_tokens):
            tokens, padding = _left_padded([list(prompts[row]) + replies[row] for row in active], pad_id)
            chosen = logits_of(tokens, padding)[:, -1].float().argmax(dim=-1).tolist()
            for row, token in zip(active, chosen):
                replies[row].append(token)
            going = [row for row in active if replies[row][-1] not in stop_ids]
            ended = len(active) - len(going)
            progress.advance(len(active) + ended * (max_new_tokens - step - 1), tokens=len(active))
            active = going
            if not active:
                break
    return replies


def common_prefix(first: Sequence[int], second: Sequence[int]) -> int:
    """The number of leading tokens ``first`` and ``second`` share."""
    count = 0
    for a, b in zip(first, second):
        if a != b:
            break
        count += 1
    return count


def reply_agreement(teacher_replies: Sequence[Sequence[int]], student_replies: Sequence[Sequence[int]]) -> dict:
    """``exact match`` (fraction of replies equal token for token) and ``common prefix`` (mean number
    of leading tokens shared with the teacher's reply)."""
    if len(teacher_replies) != len(student_replies) or not teacher_replies:
        raise ValueError(f"need as many student replies ({len(student_replies)}) as teacher replies "
                         f"({len(teacher_replies)}), at least one")
    pairs = list(zip(teacher_replies, student_replies))
    return {"exact match": sum(list(t) == list(s) for t, s in pairs) / len(pairs),
            "common prefix": sum(common_prefix(t, s) for t, s in pairs) / len(pairs)}


def ended_turns(prompts: Sequence[Sequence[int]], replies: Sequence[Sequence[int]],
                stop_id: int) -> list[tuple[list[int], list[int]]]:
    """``(prompt, reply without its stop token)`` of every reply that ends its turn (last token ``stop_id``)."""
    return [(list(prompt), list(reply[:-1])) for prompt, reply in zip(prompts, replies) if reply and reply[-1] == stop_id]


def end_of_turn_agreement(logits_of: PaddedLogits, prompts: Sequence[Sequence[int]],
                          teacher_replies: Sequence[Sequence[int]], stop_id: int, batch_size: int = 64,
                          pad_id: int = 0) -> float | None:
    """Over the prompts whose teacher reply ends its turn (last token ``stop_id``): the fraction where
    the model, given the prompt and the teacher's reply up to that token, also chooses ``stop_id``
    there (teacher forcing, so an earlier difference does not count). None when no reply ends."""
    ended = ended_turns(prompts, teacher_replies, stop_id)
    if not ended:
        return None
    agree = 0
    for first in range(0, len(ended), batch_size):
        tokens, padding = _left_padded([prompt + reply for prompt, reply in ended[first:first + batch_size]], pad_id)
        agree += int((logits_of(tokens, padding)[:, -1].float().argmax(dim=-1) == stop_id).sum())
    return agree / len(ended)
