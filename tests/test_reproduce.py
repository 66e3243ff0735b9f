"""benchmarks/reproduce_qad.py end to end at toy size on the CPU (the real run is on a GPU)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOY = ["model.num_layers=2", "model.hidden_size=128", "model.ffn_hidden_size=256", "model.num_attention_heads=4",
       "model.num_query_groups=2", "model.seq_length=64", "model.params_dtype=float32", "teacher.pretrain_iters=60",
       "training.train_iters=30", "training.global_batch_size=8", "training.micro_batch_size=4",
       "training.eval_iters=2", "training.lr=1e-4", "training.log_interval=10"]


def test_reproduction_table_has_every_variant_and_qad_beats_ptq_and_qat(tmp_path):
    results = tmp_path / "RESULTS.md"
    command = [sys.executable, "benchmarks/reproduce_qad.py", "--out", str(tmp_path / "runs"), "--results",
               str(results), *TOY]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = {line.split("|")[1].strip(): [float(cell) for cell in line.split("|")[2:6]]
            for line in results.read_text().splitlines() if line.startswith("| ") and "student |" not in line}
    assert list(rows) == ["PTQ", "PTQ 4/6", "QAT (CE)", "QAD (KL)", "QAD on random tokens", "QAD 4/6"]
    teacher_ce = {round(values[2], 6) for values in rows.values()}
    assert len(teacher_ce) == 1  # one teacher, one validation set
    kl = {name: values[0] for name, values in rows.items()}
    assert kl["QAD (KL)"] < kl["PTQ"] and kl["QAD (KL)"] < kl["QAT (CE)"]
    assert "Device: CPU" in results.read_text()
