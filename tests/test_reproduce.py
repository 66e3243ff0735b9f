"""benchmarks/reproduce_qad.py at toy size on the CPU (the real run is on a GPU): the staged teacher
at two seeds, students in two processes, evaluation, the teacher's accuracy check and the tables,
without relying on what a few steps achieve."""

import json
from pathlib import Path

import pytest
import torch

from megatron_qad import parallel
from megatron_qad.config import load_config
from megatron_qad.data import ByteTokenizer
from megatron_qad.data.tasks import Problem
from megatron_qad.models import build_model_chunks
from megatron_qad.train import checkpointing

ROOT = Path(__file__).resolve().parents[1]
GENERAL_TEXT = f"{{type: text, paths: ['{ROOT}/megatron_qad/**/*.py']}}"  # text shipped in the repo
TASK = "{type: arithmetic, num_problems: 2000, digits: 2, format: reversed, wrong_labels: 0.2, prompt_context: 1}"
# A toy model answers no problem correctly, so its RFT stage keeps all its answers (keep: correct
# is tested in test_teacher_answers.py).
TOY = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
       "model.seq_length=32", "model.params_dtype=float32", "teacher.pretrain_iters=4", "teacher.posttrain_iters=4",
       f"teacher.posttrain_sources=[{TASK}, {GENERAL_TEXT}]", "teacher.rft_iters=3",
       f"teacher.rft_sources=[{{type: teacher_answers, task: {TASK}, num_prompts: 64, keep: all, batch_size: 64}}, "
       f"{GENERAL_TEXT}]", f"data.sources=[{GENERAL_TEXT}]",
       "training.train_iters=3", "training.global_batch_size=4", "training.micro_batch_size=4",
       "training.eval_iters=1", "training.log_interval=3", "distill.calibration_iters=1"]
SMALL = ["--problems", "10", "--eval-windows", "2", "--answer-prompts", "64", "--generated-sequences", "8"]


@pytest.fixture
def reproduce_qad(monkeypatch):
    """benchmarks/reproduce_qad.py as a module that spawned worker processes import too."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import reproduce_qad

    return reproduce_qad


def weights(config, *directories: Path) -> list[dict]:
    """The model weights in each checkpoint directory, loaded into one model of ``config``."""
    context = parallel.initialize(config.parallel, seed=config.model.seed)
    try:
        chunks = build_model_chunks(config.model, config.parallel, context.device)
        loaded = []
        for directory in directories:
            checkpointing.load_model(chunks, directory)
            loaded.append({name: tensor.clone() for name, tensor in chunks[0].state_dict().items()
                           if torch.is_tensor(tensor)})
        return loaded
    finally:
        parallel.destroy()


def test_toy_benchmark_trains_staged_teachers_and_fills_the_tables(tmp_path, reproduce_qad, capsys):
    """About 2 minutes on 2 CPU cores."""
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# Results\n\nkept above\n{reproduce_qad.BEGIN}\nold\n{reproduce_qad.END}\nkept below\n")
    out = tmp_path / "runs"
    command = ["--out", str(out), "--teacher-seeds", "7,8", "--seeds", "7", "--jobs", "2", *SMALL, *TOY]
    reproduce_qad.main([*command, "--variants", "PTQ,QAT (SFT data),QAD (teacher answers)", "--qat-lrs", "3e-5",
                        "--min-teacher-accuracy", "0", "--results", str(results)])
    text = results.read_text()
    assert text.startswith("# Results\n\nkept above\n") and text.endswith("kept below\n") and "old" not in text
    rows = [line.split("|")[1:3] for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    names = [(name.strip(), second.strip()) for name, second in rows if name.strip() != "model"]
    assert names == [("BF16 teacher", "7"), ("BF16 teacher", "8"), ("BF16 teacher", "mean"),
                     ("SFT stage of the teacher", "7"), ("SFT stage of the teacher", "8"),
                     ("SFT stage of the teacher", "mean"),
                     ("BF16 teacher", "1"), ("PTQ", "1"), ("QAT (SFT data)", "1"), ("QAD (teacher answers)", "1"),
                     ("QAT (SFT data)", "3e-05"), ("QAT (SFT data)", "0.0001")]
    teacher = json.loads((out / "teacher7" / "teacher.json").read_text())
    assert teacher["task kl"] == teacher["general kl"] == 0.0  # the teacher against itself
    assert teacher["mislabelled accuracy"] is not None  # the task mislabels some held-out problems
    for name in ("ptq", "qat_sft_data", "qad_teacher_answers"):
        student = json.loads((out / "teacher7" / name / "seed7" / "recipe_lr" / "metrics.json").read_text())
        assert 0.0 <= student["accuracy"] <= 1.0 and student["task kl"] >= 0.0 and student["general kl"] >= 0.0
        assert student["task teacher ce"] == teacher["task student ce"]  # one teacher, one evaluation set
    assert (out / "teacher7" / "generated" / "answers_seed7.pt").is_file()
    # Each stage started from the one before and changed it: the teacher is the RFT model, sampled
    # from the SFT model; the two teacher seeds differ.
    config = load_config(ROOT / "configs" / "reproduce_task.yaml", TOY)
    stages = out / "teacher7" / "teacher.stages"
    assert (stages / "rft" / "teacher_answers_0.pt").is_file()
    pretrained, posttrained, sft, rft, final, other = weights(
        config, stages / "pretrain", checkpointing.student_checkpoint(stages / "posttrain"), stages / "sft",
        checkpointing.student_checkpoint(stages / "rft"), out / "teacher7" / "teacher", out / "teacher8" / "teacher")
    assert pretrained.keys() == final.keys() == other.keys()
    assert all(torch.equal(posttrained[name], sft[name]) for name in final)
    assert all(torch.equal(rft[name], final[name]) for name in final)
    assert any(not torch.equal(pretrained[name], sft[name]) for name in final)
    assert any(not torch.equal(sft[name], final[name]) for name in final)
    assert any(not torch.equal(final[name], other[name]) for name in final)
    # A teacher below the accuracy floor: one line, and the results file is left alone.
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        reproduce_qad.main([*command, "--variants", "PTQ", "--min-teacher-accuracy", "1.01",
                            "--results", str(results)])
    assert str(exit_info.value).startswith("reproduce_qad: the teacher does not do the task (seed 7: ")
    assert "\n" not in str(exit_info.value) and results.read_text() == text
    # The same models asked with and without solved problems before the prompt.
    import prompt_context
    measured = prompt_context.main(["--out", str(out), "--contexts", "0,1", "--problems", "5", *TOY])
    assert [(row["teacher seed"], row["model"], row["context"]) for row in measured] == [
        (seed, model, count) for seed in (7, 8) for model in ("SFT stage", "teacher") for count in (0, 1)]
    assert all(0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["forced accuracy"] <= 1.0 for row in measured)


def test_tables_have_every_row_with_mean_and_spread(reproduce_qad):
    results = [{"variant": name, "seed": seed, "lr": 1e-4, "accuracy": 0.5 + 0.1 * seed, "seconds": 2.0,
                "mislabelled accuracy": None if name == "PTQ" else 0.1 * seed,
                **{f"{split} {metric}": 0.01 * seed for split in ("task", "general")
                   for metric in ("kl", "student ce")}}
               for name in reproduce_qad.VARIANTS for seed in (1, 2, 3)]
    table = reproduce_qad.main_table(results).splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == list(reproduce_qad.VARIANTS)
    assert "| PTQ | 3 | 70.0 ± 10.0% | – | 2.00e-02 ± 1.0e-02 |" in table[2]
    assert all("| 3 | 70.0 ± 10.0% | 20.0 ± 10.0% | 2.00e-02 ± 1.0e-02 |" in line for line in table[3:])
    sweep = [dict(row, lr=lr) for row in results[:1] for lr in (3e-4, 1e-5)]
    sweep_lines = reproduce_qad.sweep_table(sweep).splitlines()[2:]
    assert [line.split("|")[2].strip() for line in sweep_lines] == ["1e-05", "0.0003"]
    teachers = [dict(results[0], variant=name, **{"teacher seed": seed}, accuracy=accuracy)
                for name, accuracy in (("BF16 teacher", 0.98), ("SFT stage of the teacher", 0.7)) for seed in (1, 2)]
    lines = reproduce_qad.teacher_table(teachers).splitlines()[2:]
    assert [line.split("|")[2].strip() for line in lines] == ["1", "2", "mean"] * 2
    assert "| BF16 teacher | mean | 98.0 ± 0.0% |" in lines[2]


def test_goals_report_the_ordering_and_the_recovered_loss(reproduce_qad):
    def rows(name, accuracies):
        return [{"variant": name, "accuracy": accuracy} for accuracy in accuracies]

    measured = rows("PTQ", [0.8, 0.9]) + rows("QAT (SFT data)", [0.7]) + rows("QAD (SFT data)", [0.95, 0.93])
    line = reproduce_qad.goals({"accuracy": 0.99}, measured)
    assert "holds (99.0% / 94.0% / 85.0% / 70.0%)" in line and "recovers 64% of PTQ's 14.0-point loss" in line
    assert "does not hold" in reproduce_qad.goals({"accuracy": 0.9}, measured)
    assert reproduce_qad.goals({"accuracy": 0.99}, rows("PTQ", [0.8])) == ""


def test_arguments_pick_variants_seeds_teachers_and_learning_rates(reproduce_qad, capsys):
    args = reproduce_qad.arguments(["--variants", "PTQ,QAD (SFT data)", "--seeds", "4,5", "--qat-lrs", "",
                                    "--teacher-seeds", "1,2,3", "--jobs", "4"])
    assert args.variants == ["PTQ", "QAD (SFT data)"] and args.seeds == [4, 5] and args.teacher_seeds == [1, 2, 3]
    assert args.qad_lrs == [1e-5, 3e-5] and args.qat_lrs == [] and args.jobs == 4
    defaults = reproduce_qad.arguments([])
    assert defaults.variants == list(reproduce_qad.VARIANTS) and defaults.teacher_seeds == [1]
    assert defaults.min_teacher_accuracy == 0.95
    with pytest.raises(SystemExit) as exit_info:
        reproduce_qad.arguments(["--variants", "QAD"])
    assert exit_info.value.code == 2 and "unknown variant(s) ['QAD']" in capsys.readouterr().err


def test_teacher_forced_accuracy_needs_every_answer_token(reproduce_qad):
    """prompt_context.forced_accuracy against a model that writes a fixed continuation."""
    import prompt_context
    tokenizer = ByteTokenizer()
    problems = [Problem("1+2=", "3"), Problem("10+20=", "30"), Problem("5+5=", "11")]  # the last one wrong
    prompts = [[tokenizer.eod_id, *tokenizer.encode(problem.prompt)] for problem in problems]

    def logits_of(tokens: torch.Tensor) -> torch.Tensor:  # after position p: byte p of "1+2=3\n" (the sum's text)
        logits = torch.zeros((*tokens.shape, 320))
        for row, ids in enumerate(tokens.tolist()):
            text = tokenizer.decode(ids[1:])
            question = text.split("=")[0]
            target = f"{question}={sum(map(int, question.split('+')))}\n"
            for position in range(len(ids) - 1):
                logits[row, position, ord(target[position]) if position < len(target) else 0] = 1.0
        return logits

    assert prompt_context.forced_accuracy(logits_of, problems, prompts, 2) == 2 / 3
