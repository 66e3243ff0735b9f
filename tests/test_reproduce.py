"""benchmarks/reproduce_qad.py at toy size on the CPU (the real run is on a GPU): the two-stage
teacher, students, evaluation and the tables, without relying on what a few steps achieve."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from megatron_qad import parallel
from megatron_qad.config import load_config
from megatron_qad.models import build_model_chunks
from megatron_qad.train import checkpointing

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("reproduce_qad", ROOT / "benchmarks" / "reproduce_qad.py")
reproduce_qad = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(reproduce_qad)

GENERAL_TEXT = f"{{type: text, paths: ['{ROOT}/megatron_qad/**/*.py']}}"  # text shipped in the repo
TOY = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
       "model.seq_length=32", "model.params_dtype=float32", "teacher.pretrain_iters=4", "teacher.posttrain_iters=4",
       f"teacher.posttrain_sources=[{{type: arithmetic, num_problems: 1000, digits: 2}}, {GENERAL_TEXT}]",
       f"data.sources=[{GENERAL_TEXT}]",
       "training.train_iters=3", "training.global_batch_size=4", "training.micro_batch_size=4",
       "training.eval_iters=1", "training.log_interval=3", "distill.calibration_iters=1"]


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


def test_toy_benchmark_trains_a_two_stage_teacher_and_fills_the_table(tmp_path):
    """About 30 s on 2 CPU cores."""
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# Results\n\nkept above\n{reproduce_qad.BEGIN}\nold\n{reproduce_qad.END}\nkept below\n")
    out = tmp_path / "runs"
    reproduce_qad.main(["--out", str(out), "--variants", "BF16 teacher,PTQ,QAD (general text)", "--seeds", "7",
                        "--problems", "10", "--eval-windows", "2", "--qad-lrs", "", "--results", str(results), *TOY])
    text = results.read_text()
    assert text.startswith("# Results\n\nkept above\n") and text.endswith("kept below\n") and "old" not in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert [name for name in rows if name not in ("model",)] == ["BF16 teacher", "PTQ", "QAD (general text)"]
    teacher = json.loads((out / "bf16_teacher" / "seed7" / "recipe_lr" / "metrics.json").read_text())
    assert teacher["task kl"] == teacher["general kl"] == 0.0  # the teacher against itself
    for name in ("ptq", "qad_general_text"):
        student = json.loads((out / name / "seed7" / "recipe_lr" / "metrics.json").read_text())
        assert 0.0 <= student["accuracy"] <= 1.0 and student["task kl"] >= 0.0 and student["general kl"] >= 0.0
        assert student["task teacher ce"] == teacher["task student ce"]  # one teacher, one evaluation set
    # Stage 2 started from stage 1 and changed it: the teacher is the post-trained model.
    config = load_config(ROOT / "configs" / "reproduce_task.yaml", TOY)
    stages = out / "teacher.stages"
    pretrained, posttrained, final = weights(config, stages / "pretrain",
                                             checkpointing.student_checkpoint(stages / "posttrain"), out / "teacher")
    assert pretrained.keys() == posttrained.keys() == final.keys()
    assert any(not torch.equal(pretrained[name], final[name]) for name in final)
    assert all(torch.equal(posttrained[name], final[name]) for name in final)


def test_tables_have_every_row_with_mean_and_spread():
    results = [{"variant": name, "seed": seed, "lr": 1e-4, "accuracy": 0.5 + 0.1 * seed, "seconds": 2.0,
                **{f"{split} {metric}": 0.01 * seed for split in ("task", "general")
                   for metric in ("kl", "student ce")}}
               for name in reproduce_qad.VARIANTS for seed in (1, 2, 3)]
    table = reproduce_qad.main_table(results).splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == list(reproduce_qad.VARIANTS)
    assert all("| 3 | 70.0 ± 10.0% | 2.00e-02 ± 1.0e-02 |" in line for line in table[2:])
    sweep = [dict(row, lr=lr) for row in results[:1] for lr in (3e-4, 1e-5)]
    sweep_lines = reproduce_qad.sweep_table(sweep).splitlines()[2:]
    assert [line.split("|")[2].strip() for line in sweep_lines] == ["1e-05", "0.0003"]


def test_arguments_pick_variants_seeds_and_learning_rates(capsys):
    args = reproduce_qad.arguments(["--variants", "PTQ,QAD (general text)", "--seeds", "4,5", "--qat-lrs", ""])
    assert args.variants == ["PTQ", "QAD (general text)"] and args.seeds == [4, 5]
    assert args.qad_lrs == [3e-5, 3e-4] and args.qat_lrs == []
    assert reproduce_qad.arguments([]).variants == list(reproduce_qad.VARIANTS)
    with pytest.raises(SystemExit) as exit_info:
        reproduce_qad.arguments(["--variants", "QAD"])
    assert exit_info.value.code == 2 and "unknown variant(s) ['QAD']" in capsys.readouterr().err
