"""Tokenizers for text sources: a byte-level tokenizer that needs nothing, and Hugging Face tokenizers.

Both expose ``vocab_size``, ``eod_id`` (end of document, appended after every document), ``bos_id``
(first token of teacher-generated sequences), ``encode(text) -> list[int]``,
``encode_array(text) -> int32 ndarray`` and ``decode(ids) -> str``.
"""

import functools
import os

import numpy as np

from ..config import ConfigError


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0-255 are the bytes, 256 ends a document, 257 begins a sequence."""

    name = "byte"
    eod_id = 256
    bos_id = 257
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text`` as ids in [0, 256)."""
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """:meth:`encode` as an int32 array ``[len(text.encode())]``."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        """The text of the byte ids in ``ids``; special ids are dropped, invalid UTF-8 becomes U+FFFD."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ByteTokenizer ids are in [0, {self.vocab_size}), got {bad[0]}")
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer (``transformers.AutoTokenizer``) loaded from a local directory.

    Documents are encoded without special tokens; ``eod_id`` is the tokenizer's EOS token,
    ``bos_id`` its BOS token or, when it has none, its EOS token.
    """

    def __init__(self, path: str):
        try:
            from transformers import AutoTokenizer
        except ImportError as error:
            raise ImportError(f"the Hugging Face tokenizer at {path!r} needs the transformers package: "
                              f"pip install transformers") from error
        self.name = path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.vocab_size = len(self.tokenizer)
        self.eod_id = self.tokenizer.eos_token_id
        self.bos_id = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eod_id

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS / EOS."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_array(self, text: str) -> np.ndarray:
        """:meth:`encode` as an int32 array."""
        return np.asarray(self.encode(text), dtype=np.int32)

    def decode(self, ids) -> str:
        """The text of ``ids``."""
        return self.tokenizer.decode([int(i) for i in ids])


def require_chat_template(tokenizer, key: str) -> None:
    """ConfigError naming recipe key ``key`` unless ``tokenizer`` is a Hugging Face tokenizer with a chat template."""
    if not getattr(getattr(tokenizer, "tokenizer", None), "chat_template", None):
        raise ConfigError(f"'{key}': {tokenizer.name!r} has no chat template; give the directory of a chat model's "
                          f"tokenizer (its tokenizer_config.json or chat_template.jinja holds it)")


def end_of_turn_id(tokenizer, key: str) -> int:
    """The id of the token ``tokenizer``'s chat template writes right after an assistant turn's text
    (its end-of-turn token, e.g. ``<|im_end|>``): where a served model stops generating. Taken from
    the template rather than the tokenizer's ``eos_token``, which a converted tokenizer can get wrong.
    ConfigError naming recipe key ``key`` when the template has none."""
    require_chat_template(tokenizer, key)
    reply = "Hello."
    asked = [{"role": "user", "content": "Hi"}]
    prompt = tokenizer.tokenizer.apply_chat_template(asked, tokenize=False, add_generation_prompt=True)
    full = tokenizer.tokenizer.apply_chat_template([*asked, {"role": "assistant", "content": reply}], tokenize=False)
    after = full[len(prompt):]
    ids = tokenizer.encode(after[len(reply):]) if full.startswith(prompt) and after.startswith(reply) else []
    if not ids:
        raise ConfigError(f"'{key}': the chat template of {tokenizer.name!r} writes no token after an assistant "
                          f"reply, so the end of a turn cannot be found; use a chat model's template")
    return ids[0]


def load_tokenizer(spec: str, key: str):
    """The tokenizer named by recipe value ``spec`` at key path ``key``: "byte" or a HF tokenizer directory."""
    if spec == "byte":
        return ByteTokenizer()
    if not isinstance(spec, str) or not os.path.isdir(os.path.expanduser(spec)):
        raise ConfigError(f"'{key}': {spec!r} is neither 'byte' nor an existing directory; give 'byte' or "
                          f"the directory of a Hugging Face tokenizer (its tokenizer.json / tokenizer_config.json)")
    return _load_hf(os.path.realpath(os.path.expanduser(spec)))


@functools.lru_cache(maxsize=None)
def _load_hf(path: str) -> HFTokenizer:
    return HFTokenizer(path)
