"""A task with an answer that can be checked: multi-digit addition written as text.

Problem ``i`` of a source with keys ``num_problems``, ``digits`` and ``seed`` is the line
``"A+B=C\\n"`` with ``A`` and ``B`` drawn uniformly from ``[0, 10**digits)`` and ``C = A + B``, in
plain decimal without leading zeros. The problems of a source are distinct (no pair ``(A, B)``
repeats) and depend only on ``seed`` and ``digits``: the first ``n`` problems are the same for any
``num_problems >= n``, on every machine. Each problem is one document: every 50th (positions 0, 50,
100, ...) is held out for validation (:mod:`.splits`), so an evaluation prompt never appears in the
training split.

A model solves a problem when, given ``"A+B="`` (after the end-of-document token that precedes
every document in the token stream), it continues with ``"C\\n"``.
"""

from dataclasses import dataclass

import numpy as np

from .seeds import derive_seed
from .splits import split_positions

ANSWER_SEPARATOR = "="
"""What separates a problem's prompt from its answer; the answer is the text after its first occurrence."""
END_OF_ANSWER = "\n"
"""What ends an answer."""


@dataclass(frozen=True)
class Problem:
    """One problem: the model sees ``prompt`` (e.g. ``"12+345="``) and must continue with
    ``answer + END_OF_ANSWER`` (e.g. ``"357"`` then a newline)."""

    prompt: str
    answer: str

    @property
    def text(self) -> str:
        """The training document: prompt, answer and the newline that ends it."""
        return self.prompt + self.answer + END_OF_ANSWER


def addition_problems(num_problems: int, digits: int, seed: int) -> list[Problem]:
    """``num_problems`` distinct addition problems of operands below ``10**digits`` (see the module
    docstring); ValueError when there are fewer than ``2 * num_problems`` distinct operand pairs
    (so drawing distinct pairs by rejection stays cheap)."""
    space = 10 ** (2 * digits)
    if 2 * num_problems > space:
        raise ValueError(f"{num_problems} distinct problems of {digits}-digit operands need at least "
                         f"{2 * num_problems} operand pairs, there are {space}; raise digits or lower num_problems")
    rng = np.random.Generator(np.random.PCG64(derive_seed(seed, "addition", digits)))
    seen, problems = set(), []
    while len(problems) < num_problems:
        for a, b in rng.integers(0, 10**digits, size=(num_problems, 2)).tolist():
            if (a, b) not in seen and len(problems) < num_problems:
                seen.add((a, b))
                problems.append(Problem(prompt=f"{a}+{b}{ANSWER_SEPARATOR}", answer=str(a + b)))
    return problems


def split_problems(num_problems: int, digits: int, seed: int, split: str) -> list[Problem]:
    """The problems of an ``arithmetic`` source that belong to ``split`` ("train" or "validation")."""
    problems = addition_problems(num_problems, digits, seed)
    return [problems[position] for position in split_positions(len(problems), split)]


def arithmetic_documents(spec: dict, split: str) -> list[tuple[str, str]]:
    """The documents of ``split`` of an ``arithmetic`` source ``spec`` (defaults filled in), as
    ``("arithmetic:<position>", text)`` pairs in problem order."""
    problems = addition_problems(spec["num_problems"], spec["digits"], spec["seed"])
    return [(f"arithmetic:{position}", problems[position].text)
            for position in split_positions(len(problems), split)]


def answer_of(completion: str) -> str:
    """The answer in a model's ``completion`` of a prompt: the text before the first
    :data:`END_OF_ANSWER` (all of it when there is none)."""
    return completion.split(END_OF_ANSWER, 1)[0]
