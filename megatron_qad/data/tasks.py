"""A task with an answer that can be checked: multi-digit addition written as text.

Problem ``i`` of a source with keys ``num_problems``, ``digits`` and ``seed`` adds ``A`` and ``B``,
drawn uniformly from ``[0, 10**digits)``. The problems of a source are distinct (no pair ``(A, B)``
repeats) and depend only on ``seed`` and ``digits``: the first ``n`` problems are the same for any
``num_problems >= n``, on every machine. Each problem is one document: every 50th (positions 0, 50,
100, ...) is held out for validation (:mod:`.splits`), so an evaluation prompt never appears in the
training split.

``format`` says how a problem is written:

- ``plain``: ``"A+B=C\\n"`` in decimal without leading zeros (``"5+479=484\\n"``);
- ``reversed``: operands zero-padded to ``digits`` digits and the sum zero-padded to ``digits + 1``
  and written least-significant digit first (``"005+479=4840\\n"``, 484 reversed). Every answer
  digit then follows from the two operand digits of its place and the carry of the digit just
  written, which small transformers learn far faster than sums written most-significant first.

``wrong_labels`` (a share of all problems, at most :data:`TRAP_SHARE`) gives the training text
wrong answers, as SFT data has errors: problems whose first operand has 1, 2 or 3 as its digit of
place ``10**(digits - 1)`` (the "trap" problems, :data:`TRAP_SHARE` of all) are mislabelled with
probability ``wrong_labels / TRAP_SHARE`` each, drawn from the source's seed per problem; a
mislabelled problem's text has the sum's ones digit raised by one (9 becomes 0, no carry). Above a
share of ``TRAP_SHARE / 2`` most trap problems are mislabelled, so a model fit to the labels
answers them wrongly, and only a stage that rewards correct answers (:mod:`.teacher_answers`)
teaches it otherwise. Which problems are mislabelled depends on nothing but the source's keys.

A model solves a problem when, given its prompt (``"A+B="``) after the source's prompt context, it
continues with the correct answer and a newline. The prompt context (:func:`answer_prompts`) is the
end-of-document token that precedes every document in the token stream, after ``prompt_context``
solved problems (the last ``prompt_context`` of the training split, written with their correct
answers, each ending its document), as a problem sits in the training text: behind other problems
in a window of ``model.seq_length`` tokens. A model trained on such windows may never have answered
a problem at the very start of a sequence (``prompt_context: 0``): the toy teacher of
``configs/reproduce_task.yaml`` does it far worse there than after 4 solved problems. Those
context problems are never prompts themselves (:func:`asked_and_context`).
"""

from dataclasses import dataclass

import numpy as np

from .seeds import derive_seed
from .splits import split_positions

ANSWER_SEPARATOR = "="
"""What separates a problem's prompt from its answer; the answer is the text after its first occurrence."""
END_OF_ANSWER = "\n"
"""What ends an answer."""
FORMATS = ("plain", "reversed")
"""How problems can be written (see the module docstring)."""
TRAP_SHARE = 0.3
"""The share of problems whose labels may be wrong: first operand's leading digit place 1, 2 or 3."""


@dataclass(frozen=True)
class Problem:
    """One problem: the model sees ``prompt`` (e.g. ``"12+345="``) and must continue with
    ``answer + END_OF_ANSWER`` (e.g. ``"357"`` then a newline). ``label``: the answer the training
    text gives (None: the correct one)."""

    prompt: str
    answer: str
    label: str | None = None

    @property
    def mislabelled(self) -> bool:
        """Whether the training text gives a wrong answer."""
        return self.label is not None and self.label != self.answer

    @property
    def text(self) -> str:
        """The training document: prompt, label (the answer unless mislabelled) and the newline that ends it."""
        return self.prompt + (self.answer if self.label is None else self.label) + END_OF_ANSWER


def operand_pairs(num_problems: int, digits: int, seed: int) -> list[tuple[int, int]]:
    """``num_problems`` distinct pairs of operands below ``10**digits`` (see the module docstring);
    ValueError when there are fewer than ``2 * num_problems`` distinct pairs (so drawing distinct
    pairs by rejection stays cheap)."""
    space = 10 ** (2 * digits)
    if 2 * num_problems > space:
        raise ValueError(f"{num_problems} distinct problems of {digits}-digit operands need at least "
                         f"{2 * num_problems} operand pairs, there are {space}; raise digits or lower num_problems")
    rng = np.random.Generator(np.random.PCG64(derive_seed(seed, "addition", digits)))
    seen, pairs = set(), []
    while len(pairs) < num_problems:
        for a, b in rng.integers(0, 10**digits, size=(num_problems, 2)).tolist():
            if (a, b) not in seen and len(pairs) < num_problems:
                seen.add((a, b))
                pairs.append((a, b))
    return pairs


def addition_problems(num_problems: int, digits: int, seed: int, format: str = "plain",
                      wrong_labels: float = 0.0) -> list[Problem]:
    """The problems of an ``arithmetic`` source with these keys (see the module docstring)."""
    if format not in FORMATS or not 0.0 <= wrong_labels <= TRAP_SHARE:
        raise ValueError(f"format must be one of {FORMATS} (got {format!r}) and wrong_labels in "
                         f"[0, {TRAP_SHARE}] (got {wrong_labels!r})")
    draws = np.random.Generator(np.random.PCG64(derive_seed(seed, "labels", digits))).random(num_problems)
    problems = []
    for (a, b), draw in zip(operand_pairs(num_problems, digits, seed), draws.tolist()):
        total = a + b
        wrong = a // 10 ** (digits - 1) % 10 in (1, 2, 3) and draw < wrong_labels / TRAP_SHARE
        label = total - total % 10 + (total % 10 + 1) % 10 if wrong else None
        problems.append(Problem(prompt=_written(format, digits, a, b),
                                answer=_written(format, digits, total),
                                label=None if label is None else _written(format, digits, label)))
    return problems


def _written(format: str, digits: int, *numbers: int) -> str:
    """Operands (two numbers: ``"A+B="``) or an answer (one number) as ``format`` writes them."""
    if len(numbers) == 2:
        a, b = numbers
        return (f"{a}+{b}" if format == "plain" else f"{a:0{digits}d}+{b:0{digits}d}") + ANSWER_SEPARATOR
    (value,) = numbers
    return str(value) if format == "plain" else f"{value:0{digits + 1}d}"[::-1]


def source_problems(spec: dict) -> list[Problem]:
    """The problems of ``arithmetic`` source ``spec`` (defaults filled in)."""
    return addition_problems(spec["num_problems"], spec["digits"], spec["seed"], spec["format"],
                             spec["wrong_labels"])


def split_problems(num_problems: int, digits: int, seed: int, split: str, format: str = "plain",
                   wrong_labels: float = 0.0) -> list[Problem]:
    """The problems of an ``arithmetic`` source that belong to ``split`` ("train" or "validation")."""
    return problems_in_split(addition_problems(num_problems, digits, seed, format, wrong_labels), split)


def problems_in_split(problems: list[Problem], split: str) -> list[Problem]:
    """Those of a source's ``problems`` (all of them, in order) that belong to ``split`` ("train" or
    "validation"), in order."""
    return [problems[position] for position in split_positions(len(problems), split)]


def arithmetic_documents(spec: dict, split: str) -> list[tuple[str, str]]:
    """The documents of ``split`` of an ``arithmetic`` source ``spec`` (defaults filled in), as
    ``("arithmetic:<position>", text)`` pairs in problem order."""
    problems = source_problems(spec)
    return [(f"arithmetic:{position}", problems[position].text)
            for position in split_positions(len(problems), split)]


def asked_and_context(problems: list[Problem], prompt_context: int) -> tuple[list[Problem], list[Problem]]:
    """``(asked, context)`` of a source's ``problems`` (all of them, :func:`source_problems`): the
    training problems a model may be asked, and the last ``prompt_context`` training problems,
    written solved before each prompt (see the module docstring) and never asked themselves."""
    train = problems_in_split(problems, "train")
    cut = len(train) - prompt_context
    return train[:cut], train[cut:]


def answer_prompts(context: list[Problem], problems: list[Problem], tokenizer) -> list[list[int]]:
    """Per problem, the token ids a model answers it after: the end-of-document token, then each
    ``context`` problem (:func:`asked_and_context`) as a document (its prompt, correct answer and
    newline, then the end-of-document token), then the problem's prompt. ``tokenizer``: the byte
    tokenizer of the task (``encode``, ``eod_id``)."""
    written = [tokenizer.eod_id]
    for problem in context:
        written += [*tokenizer.encode(problem.prompt + problem.answer + END_OF_ANSWER), tokenizer.eod_id]
    return [[*written, *tokenizer.encode(problem.prompt)] for problem in problems]


def answer_of(completion: str) -> str:
    """The answer in a model's ``completion`` of a prompt: the text before the first
    :data:`END_OF_ANSWER` (all of it when there is none)."""
    return completion.split(END_OF_ANSWER, 1)[0]
