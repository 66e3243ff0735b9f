"""The teacher_answers source: the teacher's sampled answers to a task's prompts, all or the correct
ones, cached; and the task's reversed format and wrong labels it is scored against."""

import pytest
import torch

from megatron_qad.config import ConfigError
from megatron_qad.data import ByteTokenizer, build_dataset, validate_sources
from megatron_qad.data.splits import split_positions
from megatron_qad.data.tasks import TRAP_SHARE, addition_problems
from megatron_qad.data.teacher_answers import answer_documents

VOCAB = 320
TASK = {"type": "arithmetic", "num_problems": 2000, "digits": 2, "format": "reversed", "wrong_labels": 0.2}
TOKENIZER = ByteTokenizer()


def label_follower(problems):
    """A teacher_sampler that writes each prompt's label (the SFT data's answer, wrong or not) and a newline."""
    by_prompt = {problem.prompt: problem for problem in problems}

    def sampler(prefix: torch.Tensor) -> torch.Tensor:
        logits = torch.full((*prefix.shape, VOCAB), -1e4)
        for row, tokens in enumerate(prefix.tolist()):  # the problem after the prompt context's last eod
            asked = tokens[len(tokens) - tokens[::-1].index(TOKENIZER.eod_id):]
            prompt, _, written = TOKENIZER.decode(asked).partition("=")
            target = by_prompt[prompt + "="].text.partition("=")[2]
            logits[row, -1, ord(target[len(written)] if len(written) < len(target) else "\n")] = 0.0
        return logits

    return sampler


def decoded(tokens) -> list[str]:
    """The documents of a token stream (each followed by the end-of-document token), as text."""
    documents, current = [], []
    for token in tokens.tolist():
        if token == TOKENIZER.eod_id:
            documents.append(TOKENIZER.decode(current))
            current = []
        else:
            current.append(token)
    return documents


def test_reversed_problems_and_their_wrong_labels():
    problems = addition_problems(4000, digits=3, seed=0, format="reversed", wrong_labels=0.2)
    assert [p.text for p in problems[:2]] == ["746+598=4431\n", "005+479=4840\n"]  # 1344 and 484, reversed
    wrong = [p for p in problems if p.mislabelled]
    assert 0.17 < len(wrong) / len(problems) < 0.23
    for problem in wrong:  # all trap problems; the ones digit (written first) raised by one
        assert problem.prompt[0] in "123" and problem.label[1:] == problem.answer[1:]
        assert int(problem.label[0]) == (int(problem.answer[0]) + 1) % 10
    assert all(p.label is None for p in addition_problems(4000, digits=3, seed=0, format="reversed"))
    assert [p.answer for p in problems] == [p.answer for p in addition_problems(4000, 3, 0, "reversed")]
    with pytest.raises(ConfigError, match=r"'data.sources\[0\].wrong_labels': must be a number from 0 to 0.3"):
        validate_sources([dict(TASK, wrong_labels=TRAP_SHARE + 0.1)], VOCAB)


def test_answers_keep_all_or_the_correct_ones_and_are_cached(tmp_path, capsys):
    problems = addition_problems(2000, digits=2, seed=0, format="reversed", wrong_labels=0.2)
    train = [problems[position] for position in split_positions(len(problems), "train")][:300]
    sampler, cache = label_follower(problems), str(tmp_path / "answers.pt")
    spec = {"type": "teacher_answers", "task": TASK, "num_prompts": 300, "cache": None, "batch_size": 128}
    every = []
    for split in ("train", "validation"):
        tokens, names = answer_documents(dict(spec, keep="all"), "w", VOCAB, 3, cache, sampler, split)
        assert len(names) == len(decoded(tokens))
        every.append(decoded(tokens))
    texts = [problem.text for problem in train]
    assert every == [[texts[p] for p in split_positions(300, split)] for split in ("train", "validation")]
    # The cache holds the samples: no teacher needed again; keep: correct drops the mislabelled answers.
    tokens, _ = answer_documents(dict(spec, keep="correct"), "w", VOCAB, 3, cache, None, "train")
    correct = [problem.text for problem in train if not problem.mislabelled]
    assert decoded(tokens) == [correct[p] for p in split_positions(len(correct), "train")]
    assert len(correct) < len(train)
    assert (f"'w': {len(correct)} of 300 sampled answers are correct ({100 * len(correct) / 300:.1f} %); "
            f"those are the data") in capsys.readouterr().out
    with pytest.raises(ValueError, match="needs the teacher to sample its answers"):
        answer_documents(dict(spec, keep="all", num_prompts=200), "w", VOCAB, 3, cache, None, "train")
    dataset = build_dataset([dict(spec, keep="all", cache=cache)], "train", 16, VOCAB, 3)
    assert TOKENIZER.decode(dataset.stream.tokens[:len(texts[1])].tolist()) == texts[1]


def test_answers_are_sampled_after_the_prompt_context_and_kept_without_it(tmp_path):
    task = dict(TASK, prompt_context=4)
    problems = addition_problems(2000, digits=2, seed=0, format="reversed", wrong_labels=0.2)
    train = [problems[position] for position in split_positions(len(problems), "train")]
    seen = []

    def sampler(prefix: torch.Tensor) -> torch.Tensor:
        seen.extend(TOKENIZER.decode(row) for row in prefix.tolist())
        return label_follower(problems)(prefix)

    spec = {"type": "teacher_answers", "task": task, "num_prompts": 100, "keep": "all", "cache": None,
            "batch_size": 128}
    tokens, _ = answer_documents(spec, "w", VOCAB, 3, None, sampler, "train")
    eod = TOKENIZER.decode([TOKENIZER.eod_id])
    context = eod + "".join(f"{p.prompt}{p.answer}\n{eod}" for p in train[-4:])
    assert seen and all(text.startswith(context) for text in seen)
    asked = train[:100]  # the context problems are never asked
    assert decoded(tokens) == [asked[p].text for p in split_positions(100, "train")]


@pytest.mark.parametrize("spec, message", [
    ({"task": {"type": "corpus"}, "num_prompts": 10}, "'data.sources[0].task': must be an arithmetic source"),
    ({"task": dict(TASK, num_problems=100), "num_prompts": 99}, "has 98 training problems"),
    ({"task": dict(TASK, num_problems=100, prompt_context=5), "num_prompts": 95}, "has 93 training problems to ask"),
    ({"task": TASK, "num_prompts": 10, "keep": "best"}, "'data.sources[0].keep': must be 'all'"),
    ({"task": dict(TASK, format="upside-down"), "num_prompts": 10}, "'data.sources[0].task.format': must be one of"),
])
def test_bad_teacher_answers_sources_name_the_key(spec, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_sources([{"type": "teacher_answers", **spec}], VOCAB)
