"""The arithmetic task source: pinned problems, correct answers, disjoint splits, clear errors."""

import re
from pathlib import Path

import pytest

from megatron_qad.config import ConfigError, load_config
from megatron_qad.data import ByteTokenizer, build_dataset, validate_sources
from megatron_qad.data.tasks import addition_problems, answer_prompts, asked_and_context, split_problems

ROOT = Path(__file__).resolve().parents[1]


def test_problems_are_pinned_distinct_and_correct():
    problems = addition_problems(3000, digits=2, seed=5)
    assert problems == addition_problems(3000, digits=2, seed=5)
    assert addition_problems(100, digits=2, seed=5) == problems[:100]  # a prefix of any longer draw
    assert addition_problems(100, digits=2, seed=6) != problems[:100]
    assert len({problem.prompt for problem in problems}) == len(problems)
    for problem in problems:
        a, b = problem.prompt.removesuffix("=").split("+")
        assert 0 <= int(a) < 100 and 0 <= int(b) < 100 and int(problem.answer) == int(a) + int(b)
        assert str(int(a)) == a and problem.text == f"{a}+{b}={problem.answer}\n"
    # The pinned draw itself (seed 0, 3 digits): a change of the generator would change the data.
    assert [problem.text for problem in addition_problems(2, digits=3, seed=0)] == ["746+598=1344\n", "5+479=484\n"]


def test_validation_problems_are_held_out_of_the_training_text():
    train, validation = (split_problems(500, 2, 0, split) for split in ("train", "validation"))
    assert len(validation) == 10 and len(train) == 490
    assert not {p.prompt for p in train} & {p.prompt for p in validation}
    tokenizer = ByteTokenizer()
    dataset = build_dataset([{"type": "arithmetic", "num_problems": 500, "digits": 2}], "validation",
                            seq_length=16, vocab_size=258, seed=1)
    stream = dataset.stream.tokens.tolist()  # every document followed by the end-of-document token
    assert stream[-1] == tokenizer.eod_id
    documents, start = [], 0
    for position, token in enumerate(stream):
        if token == tokenizer.eod_id:
            documents.append(tokenizer.decode(stream[start:position]))
            start = position + 1
    assert documents == [problem.text for problem in validation]


def test_prompts_are_answered_after_solved_training_problems():
    every = addition_problems(500, digits=2, seed=0, format="reversed", wrong_labels=0.2)
    train = split_problems(500, 2, 0, "train", "reversed", 0.2)
    asked_problems, context_problems = asked_and_context(every, 3)
    assert context_problems == train[-3:] and asked_problems == train[:-3]
    tokenizer, asked = ByteTokenizer(), train[:2]
    context = "".join(f"{problem.prompt}{problem.answer}\n{tokenizer.decode([tokenizer.eod_id])}"
                      for problem in train[-3:])  # correct answers, whatever the labels say
    for prompt, problem in zip(answer_prompts(context_problems, asked, tokenizer), asked):
        assert prompt[0] == tokenizer.eod_id and tokenizer.decode(prompt[1:]) == context + problem.prompt
    assert answer_prompts([], asked, tokenizer) == [[tokenizer.eod_id, *tokenizer.encode(p.prompt)] for p in asked]
    assert asked_and_context(every, 0) == (train, [])


@pytest.mark.parametrize("spec, message", [
    ({"type": "arithmetic", "prompt_context": -1}, "'data.sources[0].prompt_context': must be an integer >= 0"),
    ({"type": "arithmetic", "num_problems": 100, "prompt_context": 98}, "the source has 98 training problems"),
    ({"type": "arithmetic", "digits": 0}, "'data.sources[0].digits': must be an integer from 1 to 9"),
    ({"type": "arithmetic", "digits": 2, "num_problems": 6000}, "lower it to <= 5000"),
    ({"type": "arithmetic", "seed": "x"}, "'data.sources[0].seed': must be an integer"),
    ({"type": "arithmetic", "num_problems": 1}, "'data.sources[0].num_problems': must be an integer >= 2"),
])
def test_bad_arithmetic_sources_name_the_key(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_sources([spec], 258)


@pytest.mark.parametrize("overrides, message", [
    (["teacher.posttrain_iters=5"], "'teacher.posttrain_sources' is not set"),
    (["teacher.posttrain_iters=5", "teacher.pretrain_iters=0", "teacher.posttrain_sources=[{type: arithmetic}]"],
     "'teacher.pretrain_iters' is 0"),
    (["teacher.posttrain_iters=-1"], "'teacher.posttrain_iters' must be >= 0"),
])
def test_post_training_keys_are_checked(overrides, message):
    base = ["teacher.pretrain_iters=5", "teacher.posttrain_sources=null"]
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(ROOT / "configs" / "reproduce_task.yaml", [*base, *overrides])
