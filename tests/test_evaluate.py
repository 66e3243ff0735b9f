"""Task accuracy by greedy decoding, exact match, and KL / CE from logits (megatron_qad.evaluate)."""

from pathlib import Path

import pytest
import torch

from megatron_qad import parallel
from megatron_qad.config import load_config
from megatron_qad.data import ByteTokenizer
from megatron_qad.data.tasks import Problem, addition_problems, answer_prompts, asked_and_context
from megatron_qad.evaluate.agreement import averages, token_sums
from megatron_qad.evaluate.generate import exact_match, greedy_generate
from megatron_qad.evaluate.students import completion_text, logits_function, task_accuracy
from megatron_qad.models import build_model_chunks

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ByteTokenizer()


def next_token_model(rule, vocab_size: int, calls: list | None = None):
    """A hand-built 'model': logits [b, t, V] that put 1.0 on ``rule(prefix of the row)`` at the last position."""

    def logits_of(tokens: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(tuple(tokens.shape))
        logits = torch.zeros(*tokens.shape, vocab_size)
        for row, prefix in enumerate(tokens.tolist()):
            logits[row, -1, rule(prefix)] = 1.0
        return logits

    return logits_of


def test_greedy_decoding_stops_per_row_and_never_pads(capsys):
    # Next token: (last token + 1) mod 5; 0 is the stop token.
    calls = []
    model = next_token_model(lambda prefix: (prefix[-1] + 1) % 5, vocab_size=5, calls=calls)
    outputs = greedy_generate(model, [[0], [1, 2], [4, 4], [3]], max_new_tokens=6, stop_ids={0}, batch_size=8)
    assert outputs == [[1, 2, 3, 4], [3, 4], [], [4]]
    # Prompts of one length go together (no padding) and a row that stopped leaves its batch:
    # [3] stops after 2 calls, [0] after 5; [4, 4] after 1, [1, 2] after 3.
    assert calls == [(2, 1), (2, 2), (1, 3), (1, 4), (1, 5), (2, 2), (1, 3), (1, 4)]
    # Progress through 4 x 6 token slots, a line per tenth crossed: a row that stops fills its
    # remaining slots ([3] at the 2nd call: 2 -> 8 of 24; [4, 4] at the 6th: 12 -> 19).
    progress = [line.split(",")[0] for line in capsys.readouterr().out.splitlines()]
    assert progress == [f"greedy generation: {p} % ({n}/24 token slots)" for p, n in
                        ((33, 8), (41, 10), (50, 12), (79, 19), (83, 20))] + ["greedy generation: 100 % (24 token slots) in "
                                                                             + progress[-1].split(" in ")[1]]
    assert greedy_generate(model, [[0]], max_new_tokens=2, stop_ids={0}) == [[1, 2]]


def test_greedy_decoding_breaks_ties_to_the_lowest_id_and_splits_batches():
    ties = lambda tokens: torch.ones(*tokens.shape, 5)  # noqa: E731  every id equally likely
    assert greedy_generate(ties, [[1], [2], [3]], max_new_tokens=2, stop_ids=set(), batch_size=2) == [[0, 0]] * 3
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        greedy_generate(ties, [[1], []], max_new_tokens=2, stop_ids=set())


def test_exact_match_compares_whole_answers():
    assert exact_match(["357", "35", "357 ", "0357", "357"], ["357"] * 4 + ["358"]) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="as many completions"):
        exact_match(["1"], ["1", "2"])


def solver(offset: int = 0, trailing: str = ""):
    """Next byte of the correct continuation ``str(A + B + offset) + trailing + newline`` of the row's
    last ``"A+B="`` problem (after the last end-of-document token)."""

    def rule(prefix: list[int]) -> int:
        text = TOKENIZER.decode(prefix[len(prefix) - prefix[::-1].index(TOKENIZER.eod_id):])
        question, written = text.split("=")
        a, b = question.split("+")
        target = f"{int(a) + int(b) + offset}{trailing}\n"
        return TOKENIZER.encode(target[len(written)])[0] if len(written) < len(target) else TOKENIZER.eod_id

    return rule


def asked_after(problems: list[Problem], prompt_context: int = 0) -> list[list[int]]:
    """The token ids each problem is answered after, with ``prompt_context`` solved problems before it."""
    _, context = asked_and_context(addition_problems(100, digits=3, seed=0), prompt_context)
    return answer_prompts(context, problems, TOKENIZER)


@pytest.mark.parametrize("offset, trailing, expected", [(0, "", 1.0), (1, "", 0.0), (0, "0", 0.0)])
def test_task_accuracy_is_exact_match_of_the_greedy_answer(offset, trailing, expected):
    problems = addition_problems(40, digits=3, seed=2)  # answers of 1 to 4 digits: several prompt lengths
    model = next_token_model(solver(offset, trailing), TOKENIZER.vocab_size)
    assert task_accuracy(model, problems, asked_after(problems), batch_size=16) == expected


def test_tokens_that_are_no_byte_never_match_an_answer():
    assert completion_text(list(b"123")) == "123"
    assert completion_text([49, TOKENIZER.bos_id]) != "1" and completion_text([49, 300]) != "1"
    problems = [Problem("1+2=", "3")]
    runs_on = next_token_model(lambda prefix: TOKENIZER.bos_id if prefix[-1] == ord("3") else ord("3"), 320)
    # "3" then BOS: not the answer "3" plus a stop
    assert task_accuracy(runs_on, problems, asked_after(problems), 8) == 0.0


@pytest.mark.parametrize("prompt_context", [0, 3])
def test_task_accuracy_counts_the_problems_solved(prompt_context):
    problems = [Problem("1+2=", "3"), Problem("10+20=", "31"), Problem("5+5=", "10")]  # one wrong reference
    prompts = asked_after(problems, prompt_context)
    assert task_accuracy(next_token_model(solver(), TOKENIZER.vocab_size), problems, prompts, 8) == pytest.approx(2 / 3)


def test_token_sums_match_torch_kl_and_cross_entropy():
    generator = torch.Generator().manual_seed(0)
    teacher, student = (torch.randn(2, 5, 11, generator=generator) * 3 for _ in range(2))
    labels = torch.randint(0, 11, (2, 5), generator=generator)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    keep = mask.bool()
    kl = torch.nn.functional.kl_div(student.log_softmax(-1)[keep], teacher.log_softmax(-1)[keep],
                                    log_target=True, reduction="batchmean")
    sums = token_sums(teacher, student, labels, mask)
    means = averages([sums])
    assert sums["tokens"] == 8
    assert means["kl"] == pytest.approx(float(kl), rel=1e-5)
    assert means["student ce"] == pytest.approx(float(torch.nn.functional.cross_entropy(student[keep], labels[keep])),
                                                rel=1e-5)
    assert means["teacher ce"] == pytest.approx(float(torch.nn.functional.cross_entropy(teacher[keep], labels[keep])),
                                                rel=1e-5)
    agree = (teacher.argmax(-1) == student.argmax(-1))[keep].float().mean()
    assert means["top1 agreement"] == pytest.approx(float(agree))
    assert token_sums(teacher, teacher, labels, mask)["kl"] == pytest.approx(0.0, abs=1e-5)


def test_token_sums_are_the_same_a_few_tokens_at_a_time(monkeypatch):
    """The float32 copies are made a few tokens of one sequence at a time (agreement.CHUNK_ELEMENTS);
    here two tokens (22 logits) a chunk, of logits with a batch stride (as a model's transposed
    output has), against the whole batch at once (float32 sums of at most 15 tokens: rel 1e-6); an
    empty batch sums to zero tokens."""
    from megatron_qad.evaluate import agreement

    generator = torch.Generator().manual_seed(1)
    teacher, student = (torch.randn(5, 3, 11, generator=generator).transpose(0, 1) * 3 for _ in range(2))
    labels = torch.randint(0, 11, (3, 5), generator=generator)
    mask = (torch.rand(3, 5, generator=generator) > 0.3).float()
    log_t, log_s = teacher.log_softmax(-1), student.log_softmax(-1)
    whole = {"kl": float(((log_t.exp() * (log_t - log_s)).sum(-1) * mask).sum()),
             "student ce": float((-log_s.gather(-1, labels[..., None])[..., 0] * mask).sum()),
             "teacher ce": float((-log_t.gather(-1, labels[..., None])[..., 0] * mask).sum()),
             "top1 agreement": float(((log_t.argmax(-1) == log_s.argmax(-1)).float() * mask).sum()),
             "tokens": float(mask.sum())}
    monkeypatch.setattr(agreement, "CHUNK_ELEMENTS", 22)
    by_chunk = token_sums(teacher, student, labels, mask)
    assert by_chunk.keys() == whole.keys()
    assert all(by_chunk[name] == pytest.approx(whole[name], rel=1e-6) for name in whole)
    assert token_sums(teacher[:0], student[:0], labels[:0], mask[:0])["tokens"] == 0


def test_greedy_decoding_of_a_megatron_model_follows_its_own_argmax():
    """A real (untrained) GPT: each generated token is the argmax of the model's logits over the
    whole generated sequence at the position before it, and decoding prompts together or one by
    one gives the same tokens."""
    config = load_config(ROOT / "configs" / "reproduce_task.yaml",
                         ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
                          "model.seq_length=32", "model.params_dtype=float32", "model.num_attention_heads=4"])
    context = parallel.initialize(config.parallel, seed=config.model.seed)
    try:
        (model,) = build_model_chunks(config.model, config.parallel, context.device)
        logits_of = logits_function(model.eval(), context.device)
        prompts = [[256, 49, 43], [256, 50, 43], [256, 55, 55, 43, 49]]
        together = greedy_generate(logits_of, prompts, max_new_tokens=6, stop_ids=set(), batch_size=4)
        assert together == [greedy_generate(logits_of, [prompt], 6, set())[0] for prompt in prompts]
        for prompt, generated in zip(prompts, together):
            sequence = torch.tensor([prompt + generated])
            chosen = logits_of(sequence)[0].argmax(dim=-1)
            assert chosen[len(prompt) - 1:-1].tolist() == generated
    finally:
        parallel.destroy()
