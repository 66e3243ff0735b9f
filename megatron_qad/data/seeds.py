"""Seeds derived from the run seed and a few names: identical in every process and on every machine."""

import hashlib

import torch


def derive_seed(seed: int, *parts: int | str) -> int:
    """A 63-bit seed for the random stream named by ``parts`` (ints and strings) under run ``seed``.

    It is a BLAKE2b hash of the values, not Python's ``hash()``, so every process and machine gets the
    same number, and streams with different parts are independent.
    """
    values = (int(seed),) + tuple(part if isinstance(part, str) else int(part) for part in parts)
    digest = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def generator(seed: int, *parts: int | str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` of the same arguments."""
    gen = torch.Generator()
    gen.manual_seed(derive_seed(seed, *parts))
    return gen
