"""Chat data: prompt / response pairs rendered by a Hugging Face tokenizer's chat template.

A ``chat`` source reads JSON-lines files whose records hold a user prompt and the assistant's
response (``{"prompt": "...", "response": "..."}``; the field names are settings). Each record
becomes one conversation's tokens, ``template(user prompt, generation prompt) + template(assistant
response)``, exactly as the tokenizer's chat template writes the two-turn conversation, so the
response part ends with the template's end-of-turn token(s). A record whose ``ended`` field (a
setting too) is false holds a response cut before its turn ended (a sample that reached its length
limit): its tokens are the prompt's followed by the response's, with no end of turn. Conversations
are concatenated into one stream and cut into windows like any text source (a window may start
inside a conversation).

Which tokens carry the loss (``loss_on``): ``response`` (default) counts only the labels that are
response tokens, end-of-turn included: a served model is given the prompt and generates the
response, so that is the distribution to match; the template's system and user tokens are inputs
only. ``all`` counts every token.
"""

import numpy as np

from ..config import ConfigError
from .documents import jsonl_records
from .splits import split_positions
from .tokenizers import load_tokenizer, require_chat_template


def conversation_tokens(tokenizer, prompt: str, response: str, where: str,
                        ended: bool = True) -> tuple[list[int], int]:
    """``(tokens, response_start)``: the ids of the two-turn conversation (user ``prompt``, assistant
    ``response``) as ``tokenizer``'s chat template writes it, and the index of its first response token;
    with ``ended`` false, the prompt's ids followed by the response's alone (no end of turn).

    ``tokenizer`` is a :class:`~megatron_qad.data.tokenizers.HFTokenizer` with a chat template. The
    prompt part (template up to the assistant's generation prompt) and the rest are tokenized
    apart, so the prompt's tokens are exactly those a served model is given. Raises ConfigError
    naming ``where`` when the template's conversation does not start with its generation prompt.
    """
    prompt_text = _template(tokenizer, [{"role": "user", "content": prompt}], True, where)
    if not ended:
        prompt_ids = tokenizer.encode(prompt_text)
        return prompt_ids + tokenizer.encode(response), len(prompt_ids)
    full_text = _template(tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                          False, where)
    if not full_text.startswith(prompt_text):
        raise ConfigError(f"'{where}': the chat template of {tokenizer.name!r} writes a prompt differently when a "
                          f"response follows it, so the response tokens cannot be told apart; use a template whose "
                          f"generation prompt is a prefix of the conversation")
    prompt_ids = tokenizer.encode(prompt_text)
    return prompt_ids + tokenizer.encode(full_text[len(prompt_text):]), len(prompt_ids)


def prompt_tokens(tokenizer, prompt: str, where: str) -> list[int]:
    """The ids of one user turn ``prompt`` followed by the assistant's generation prompt (chat template)."""
    return tokenizer.encode(_template(tokenizer, [{"role": "user", "content": prompt}], True, where))


def _template(tokenizer, messages: list[dict], generation_prompt: bool, where: str) -> str:
    require_chat_template(tokenizer, f"{where}.tokenizer")
    return tokenizer.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def chat_stream(spec: dict, where: str, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(tokens int32 [n], label_mask bool [n], documents)`` of the ``split`` records of chat source ``spec``.

    ``label_mask[i]`` is True when token ``i`` counts as a label (see ``loss_on`` in the module
    docstring). Records at positions ``0, 50, 100, ...`` of the files (in path order) are the
    validation split, the rest train.
    """
    tokenizer = load_tokenizer(spec["tokenizer"], f"{where}.tokenizer")
    records = jsonl_records(spec["paths"], (spec["prompt_field"], spec["response_field"]), f"{where}.paths",
                            f"{where}.prompt_field / response_field")
    tokens, masks, documents = [], [], []
    for position in split_positions(len(records), split):
        name, record = records[position]
        ended = record.get(spec["ended_field"], True)
        if not isinstance(ended, bool):
            raise ConfigError(f"'{where}.ended_field': {name} has {spec['ended_field']!r} = {ended!r}; it must be "
                              f"true or false (false: the response was cut before its turn ended)")
        ids, start = conversation_tokens(tokenizer, record[spec["prompt_field"]], record[spec["response_field"]],
                                         where, ended)
        mask = np.ones(len(ids), dtype=bool)
        if spec["loss_on"] == "response":
            mask[:start] = False
        tokens.append(np.asarray(ids, dtype=np.int32))
        masks.append(mask)
        documents.append(name)
    if not tokens:
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=bool), documents
    return np.concatenate(tokens), np.concatenate(masks), documents
