"""``scripts/pretrain_qad.py``: QAD from a Megatron-LM command line, on 2 CPU processes.

A Megatron-LM user's flags (model, batch, LR schedule, ``--mock-data`` with Megatron's own GPT
dataset and NullTokenizer, ``--save`` / ``--load``, ``--exit-interval``, ``--exit-signal-handler``)
plus the QAD flags. The teacher is a Megatron-LM checkpoint directory written by the same loop in
``--qad-mode teacher``, loaded as it is. Stops go through Megatron's own mechanisms (its exit
interval, its signal handler); a step with a non-finite loss or gradient through the divergence
policy, which stops the run or has Megatron's optimizer skip the step.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distributed_helpers import single_process
from megatron_qad.config import ParallelConfig
from torchrun_helpers import json_lines

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "pretrain_qad.py"

MEGATRON_FLAGS = [
    "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
    "--group-query-attention", "--num-query-groups", "2", "--seq-length", "32", "--max-position-embeddings", "32",
    "--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--position-embedding-type", "rope",
    "--normalization", "RMSNorm", "--hidden-dropout", "0", "--attention-dropout", "0",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "255", "--make-vocab-size-divisible-by", "1",
    "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-3", "--min-lr", "1e-4",
    "--lr-decay-style", "cosine", "--log-interval", "1", "--eval-iters", "1", "--eval-interval", "1000",
    "--distributed-backend", "gloo", "--num-workers", "0", "--calculate-per-token-loss", "--ckpt-format", "torch_dist",
    "--no-save-rng", "--no-load-rng", "--seed", "1234", "--transformer-impl", "local",
]


def _torchrun_argv(*flags: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(SCRIPT),
            *MEGATRON_FLAGS, *flags]


def _env() -> dict:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}


def pretrain_qad(*flags: str, expect: tuple[int, ...] = (0,)) -> dict:
    """Run the script under torchrun (2 processes); its summary line (exit code one of ``expect``)."""
    result = subprocess.run(_torchrun_argv(*flags), env=_env(), cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode in expect, result.stdout[-3000:] + result.stderr[-3000:]
    (summary,) = json_lines(result.stdout, "summary ")
    summary["stdout"] = result.stdout
    return summary


@pytest.fixture(scope="module")
def megatron_teacher(tmp_path_factory) -> Path:
    """A small BF16-style teacher trained by Megatron's loop, as a Megatron-LM checkpoint directory."""
    directory = tmp_path_factory.mktemp("megatron") / "teacher"
    pretrain_qad("--qad-mode", "teacher", "--train-iters", "6", "--save", str(directory), "--save-interval", "6")
    assert (directory / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    return directory


def _losses(summary: dict) -> list[float]:
    return [line["loss"] for line in summary["train"]]


def test_megatron_command_line_trains_stops_and_resumes_exactly(tmp_path, megatron_teacher):
    """DP=2: PTQ then QAD against the Megatron-LM teacher checkpoint; a run stopped by
    --exit-interval and resumed with --load repeats the uninterrupted run's losses."""
    qad = ["--qad-teacher-load", str(megatron_teacher), "--qad-loss", "kl", "--qad-calibration-iters", "1",
           "--train-iters", "4"]
    whole = pretrain_qad(*qad, "--save", str(tmp_path / "a"), "--save-interval", "4")
    assert whole["ptq"]["kl"] > 0 and whole["final"]["kl"] > 0 and len(whole["train"]) == 4
    first = pretrain_qad(*qad, "--save", str(tmp_path / "b"), "--load", str(tmp_path / "b"), "--save-interval", "4",
                         "--exit-interval", "2")
    assert first["stopped_at"] == 2 and first["exit_code"] == 0
    assert "stopped after iteration 2" in first["stdout"]
    resumed = pretrain_qad(*qad, "--save", str(tmp_path / "b"), "--load", str(tmp_path / "b"), "--save-interval", "4")
    assert resumed["ptq"] is None
    assert _losses(first) + _losses(resumed) == _losses(whole)
    assert resumed["final"] == whole["final"]


def test_sigterm_to_one_rank_saves_and_exits_cleanly(tmp_path, megatron_teacher):
    """SIGTERM to one of the two ranks: both finish the step, save, and exit 0 (Megatron's
    distributed signal handler all-gathers the flag)."""
    import psutil

    run_dir = tmp_path / "run"
    argv = _torchrun_argv("--qad-teacher-load", str(megatron_teacher), "--qad-calibration-iters", "1",
                          "--train-iters", "10000", "--save", str(run_dir), "--save-interval", "10000",
                          "--exit-signal-handler")
    process = subprocess.Popen(argv, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + 300
    for line in process.stdout:
        lines.append(line)
        if " iteration        2/" in line:
            # torchrun's children; theirs (the checkpoint-save queue's process) are not ranks
            ranks = psutil.Process(process.pid).children()
            os.kill(ranks[-1].pid, signal.SIGTERM)
            break
        assert time.monotonic() < deadline, "".join(lines[-40:])
    output = "".join(lines) + process.stdout.read()
    assert process.wait(timeout=300) == 0, output[-3000:]
    (summary,) = json_lines(output, "summary ")
    assert 2 <= summary["stopped_at"] < 10000 and summary["exit_code"] == 0
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text().strip() == str(summary["stopped_at"])


def test_the_checkpoint_save_queue_outlives_an_exit_signal_sent_to_every_process(monkeypatch):
    """SLURM's warning signal reaches every process of a job step, the process of megatron.core's
    checkpoint-save results queue too. Started by the run (the exit signals blocked), it outlives
    SIGUSR1 and SIGTERM and still serves; started as megatron.core starts it, it dies of SIGUSR1."""
    import psutil
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_qad.train.megatron import _start_save_results_queue

    def start(exit_signals):
        """A new results queue and its server process (a spawned child of this process)."""
        monkeypatch.setattr(filesystem_async, "_results_queue", None)
        before = set(psutil.Process().children())
        _start_save_results_queue(exit_signals)
        (server,) = [child for child in set(psutil.Process().children()) - before
                     if "spawn_main" in " ".join(child.cmdline())]
        return filesystem_async._results_queue, server

    queue, server = start([signal.SIGTERM, signal.SIGUSR1])
    server.send_signal(signal.SIGUSR1)
    server.send_signal(signal.SIGTERM)
    queue.put("write results")
    assert queue.get(timeout=30) == "write results" and server.is_running()
    _, plain = start([])
    plain.send_signal(signal.SIGUSR1)
    assert plain.wait(timeout=30) == -signal.SIGUSR1


def _checkpoint(directory: Path) -> tuple[dict, dict]:
    """(the tensors: model and optimizer state, the common state: optimizer step count and param
    groups, LR schedule, ...) of a torch_dist checkpoint directory."""
    from megatron.core import dist_checkpointing

    with single_process(ParallelConfig()):  # megatron.core's loader asks for a process group
        tensors = dist_checkpointing.load_plain_tensors(str(directory))
        common = dist_checkpointing.load_common_state_dict(str(directory))
    return {name: value for name, value in tensors.items() if isinstance(value, torch.Tensor)}, common


def _assert_finite(directory: Path) -> None:
    tensors, _ = _checkpoint(directory)
    floats = [tensor for tensor in tensors.values() if tensor.is_floating_point()]
    assert floats and all(torch.isfinite(tensor).all() for tensor in floats), directory


def _stop_line(summary: dict) -> str:
    (line,) = [line for line in summary["stdout"].splitlines() if line.startswith("stopped in iteration")]
    return line


DIVERGING = ("--qad-calibration-iters", "1", "--train-iters", "20", "--lr", "1e6", "--min-lr", "1e5",
             "--save-interval", "1")


def test_a_diverging_run_stops_before_the_step_and_resumes_from_its_last_finite_checkpoint(tmp_path, megatron_teacher):
    """LR 1e6, the default policy (stop): the first step with a non-finite loss or gradient ends the
    run before its update, exit 17, one line naming the iteration, the value and the last good
    checkpoint, which is finite. A run resumed from it stops at its first step the same way (the
    first step of a job, which Megatron's rerun state machine leaves unchecked) and saves nothing."""
    run_dir = tmp_path / "run"
    flags = ("--qad-teacher-load", str(megatron_teacher), *DIVERGING, "--save", str(run_dir))
    summary = pretrain_qad(*flags, expect=(1,))  # torchrun's code for a failed worker
    stopped, tracker = summary["stopped_at"], run_dir / "latest_checkpointed_iteration.txt"
    assert summary["exit_code"] == 17 and "final" not in summary and "skipped" not in summary
    assert int(tracker.read_text()) == stopped - 1 >= 1 and not (run_dir / f"iter_{stopped:07d}").exists()
    line = _stop_line(summary)
    assert re.fullmatch(rf"stopped in iteration {stopped}: (loss|gradient norm) (NaN|Inf)( and Inf)? "
                        rf"\(training.on_nonfinite=stop, .*\)\. The step was not applied, the last good checkpoint "
                        rf"is iteration {stopped - 1} in {re.escape(str(run_dir))}; .*", line), line
    _assert_finite(run_dir / f"iter_{stopped - 1:07d}")

    resumed = pretrain_qad(*flags, "--load", str(run_dir), expect=(1,))
    assert (resumed["stopped_at"], resumed["exit_code"], resumed["ptq"]) == (stopped, 17, None)
    assert _stop_line(resumed) == line
    assert int(tracker.read_text()) == stopped - 1 and not (run_dir / f"iter_{stopped:07d}").exists()


def test_skipped_steps_change_nothing_and_too_many_in_a_row_stop_the_run(tmp_path, megatron_teacher):
    """LR 1e6 with --qad-on-nonfinite skip --qad-max-skipped-steps 2: the first two non-finite steps
    are skipped (Megatron's skipped iterations: their checkpoints hold the last applied step's
    weights, Adam moments and step count, learning rate and LR schedule bit for bit), the third in
    a row stops the run (exit 17) with one line naming the skipped iterations and the setting."""
    run_dir = tmp_path / "run"
    summary = pretrain_qad("--qad-teacher-load", str(megatron_teacher), *DIVERGING, "--save", str(run_dir),
                           "--qad-on-nonfinite", "skip", "--qad-max-skipped-steps", "2", expect=(1,))
    first = summary["skipped"][0]
    assert summary["skipped"] == [first, first + 1] and first >= 2
    assert (summary["stopped_at"], summary["exit_code"]) == (first + 2, 17) and "final" not in summary
    assert f"iteration {first}: " in summary["stdout"] and "step skipped (1 in a row, at most 2" in summary["stdout"]
    line = _stop_line(summary)
    assert (f", 3 non-finite steps in a row (iterations {first}-{first + 1} skipped) are more than "
            f"training.max_skipped_steps=2 (--qad-max-skipped-steps). The step was not applied, the last good "
            f"checkpoint is iteration {first + 1} in {run_dir}") in line, line
    applied_tensors, applied = _checkpoint(run_dir / f"iter_{first - 1:07d}")
    _assert_finite(run_dir / f"iter_{first - 1:07d}")
    assert any(name.startswith("optimizer.state.exp_avg_sq.") for name in applied_tensors)
    for iteration in (first, first + 1):
        tensors, common = _checkpoint(run_dir / f"iter_{iteration:07d}")
        assert common["iteration"] == iteration and tensors.keys() == applied_tensors.keys()
        assert all(torch.equal(tensors[name], applied_tensors[name]) for name in tensors)
        assert common["optimizer"]["state"]["common_step"] == applied["optimizer"]["state"]["common_step"] == first - 1
        assert common["optimizer"]["param_groups"] == applied["optimizer"]["param_groups"]
        assert common["opt_param_scheduler"] == applied["opt_param_scheduler"]
