"""``scripts/pretrain_qad.py``: QAD from a Megatron-LM command line, on 2 CPU processes.

A Megatron-LM user's flags (model, batch, LR schedule, ``--mock-data`` with Megatron's own GPT
dataset and NullTokenizer, ``--save`` / ``--load``, ``--exit-interval``, ``--exit-signal-handler``)
plus the QAD flags. The teacher is a Megatron-LM checkpoint directory written by the same loop in
``--qad-mode teacher``, loaded as it is. Stops go through Megatron's own mechanisms (its exit
interval, its signal handler); a step with a non-finite loss or gradient through the divergence
policy, which stops the run or has Megatron's optimizer skip the step.
"""

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from torchrun_helpers import (GPT_STYLE_FLAGS, all_finite, json_lines, pretrain_qad_command, read_checkpoints,
                              run_pretrain_qad, same_state, script_env)

ROOT = Path(__file__).resolve().parents[1]

MEGATRON_FLAGS = [
    "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
    "--num-query-groups", "2", "--seq-length", "32", "--max-position-embeddings", "32",
    "--vocab-size", "255", "--make-vocab-size-divisible-by", "1",
    "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-3", "--min-lr", "1e-4",
    "--distributed-backend", "gloo", "--no-save-rng", "--no-load-rng", *GPT_STYLE_FLAGS,
]


def _torchrun_argv(*flags: str) -> list[str]:
    return pretrain_qad_command(2, *MEGATRON_FLAGS, *flags)


def _env() -> dict:
    return script_env(CUDA_VISIBLE_DEVICES="")


def pretrain_qad(*flags: str, expect: tuple[int, ...] = (0,)) -> dict:
    """Run the script under torchrun (2 processes); its summary line (exit code one of ``expect``)."""
    return run_pretrain_qad(2, [*MEGATRON_FLAGS, *flags], _env(), expect)


@pytest.fixture(scope="module")
def megatron_teacher(tmp_path_factory) -> Path:
    """A small BF16-style teacher trained by Megatron's loop, as a Megatron-LM checkpoint directory."""
    directory = tmp_path_factory.mktemp("megatron") / "teacher"
    pretrain_qad("--qad-mode", "teacher", "--train-iters", "6", "--save", str(directory), "--save-interval", "6")
    assert (directory / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    return directory


def _losses(summary: dict) -> list[float]:
    return [line["loss"] for line in summary["train"]]


def test_help_lists_megatron_and_qad_flags():
    """``--help``: Megatron-LM's flags (one of megatron-core 0.19.2's help texts holds a bare '%',
    which argparse cannot format) and the QAD flags, exit code 0."""
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain_qad.py"), "--help"], env=_env(), cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stdout.startswith("usage: pretrain_qad.py ")
    for flag in ("--num-layers", "--moe-paged-stash-buffer-size-factor-cuda", "--qad-teacher-load", "--qad-console"):
        assert f"\n  {flag} " in result.stdout, flag
    assert "Magnitude is headroom (e.g. 1.10 = 10%)." in " ".join(result.stdout.split())
    assert "\nQAD (megatron_qad):\n" in result.stdout


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


def test_moe_grouped_gemm_trains_on_the_cpu():
    """Megatron-LM's --moe-grouped-gemm on a local-spec MoE model: its validate_args asks the device
    for GroupedGEMM support, which the CPU gives through torch's grouped_mm (cpu_support); the
    experts run as grouped GEMMs (megatron_qad.grouped_experts) and train."""
    summary = run_pretrain_qad(1, [*MEGATRON_FLAGS, "--num-experts", "4", "--moe-grouped-gemm",
                                   "--moe-token-dispatcher-type", "allgather", "--qad-mode", "teacher",
                                   "--train-iters", "2"], _env())
    (first, last) = re.search(r"teacher trained: 2 iterations, .* cross entropy (\S+) -> (\S+)", summary["stdout"]).groups()
    assert math.isfinite(float(first)) and math.isfinite(float(last))


def test_a_resume_with_another_lr_schedule_names_the_megatron_flags(megatron_teacher, capsys):
    """--load of a checkpoint saved with other schedule flags (the teacher's run: --train-iters 6,
    --lr 1e-3) stops before anything is built, naming the flags (old -> new) and Megatron's fix."""
    from megatron_qad.cli import run_megatron_command_line

    base = [*MEGATRON_FLAGS, "--qad-mode", "teacher", "--load", str(megatron_teacher)]
    assert run_megatron_command_line([*base, "--train-iters", "8", "--lr", "2e-3"]) == 2
    assert capsys.readouterr().err == (
        f"pretrain_qad: error: --load {megatron_teacher} resumes iteration 6, which was saved with another LR "
        f"schedule: --lr 0.001 -> 0.002; --train-iters 6 -> 8 (no --lr-decay-iters: --train-iters is also the number "
        f"of iterations the LR decays over); pass --override-opt_param-scheduler to apply the new values, or "
        f"--use-checkpoint-opt_param-scheduler to keep the checkpoint's\n")
    for train_iters in (4, 6):  # 6: the finished run launched again
        assert run_megatron_command_line([*base, "--train-iters", str(train_iters)]) == 2
        assert capsys.readouterr().err == (f"pretrain_qad: error: --train-iters {train_iters} is not above iteration "
                                           f"6 of the checkpoint in --load {megatron_teacher}: nothing is left to "
                                           f"train; pass --train-iters above 6 to train further, or pass another "
                                           f"--load\n")


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
    SIGUSR1 and SIGTERM and still serves, also where an earlier save in the process (an import, a
    benchmark's PTQ student) had megatron.core start one; started as megatron.core starts it, it
    dies of SIGUSR1."""
    import psutil
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_qad.train import megatron

    def servers() -> set:
        return {child for child in psutil.Process().children() if "spawn_main" in " ".join(child.cmdline())}

    def start(exit_signals, megatron_first=False):
        """A new results queue and its server process (a spawned child of this process); where
        megatron.core started one first, its server process ends."""
        monkeypatch.setattr(filesystem_async, "_results_queue", None)
        monkeypatch.setattr(megatron, "_signal_proof_queue", None)
        before = servers()
        if megatron_first:
            filesystem_async.get_write_results_queue()
            (replaced,) = servers() - before
        megatron._start_save_results_queue(exit_signals)
        (server,) = servers() - before - ({replaced} if megatron_first else set())
        if megatron_first:
            replaced.wait(timeout=30)  # psutil.TimeoutExpired if it outlives its queue
        return filesystem_async._results_queue, server

    for megatron_first in (False, True):
        queue, server = start([signal.SIGTERM, signal.SIGUSR1], megatron_first)
        server.send_signal(signal.SIGUSR1)
        server.send_signal(signal.SIGTERM)
        queue.put("write results")
        assert queue.get(timeout=30) == "write results" and server.is_running()
    _, plain = start([])
    plain.send_signal(signal.SIGUSR1)
    assert plain.wait(timeout=30) == -signal.SIGUSR1


def test_the_checkpoint_save_queue_dies_with_its_rank():
    """A rank killed outright (SIGKILL: no exit handler runs) takes its save-results queue along,
    which would otherwise live on as an orphan that ignores SIGTERM."""
    import psutil

    code = ("import signal, time\n"
            "from megatron_qad.train.megatron import _start_save_results_queue\n"
            "_start_save_results_queue([signal.SIGTERM, signal.SIGUSR1])\n"
            "print('ready', flush=True)\n"
            "time.sleep(600)\n")
    rank = subprocess.Popen([sys.executable, "-c", code], env=_env(), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert rank.stdout.readline().strip() == "ready"
        (server,) = [child for child in psutil.Process(rank.pid).children()
                     if "spawn_main" in " ".join(child.cmdline())]
    finally:
        rank.kill()
        rank.wait(timeout=30)
    server.wait(timeout=30)  # psutil.TimeoutExpired if it outlives the rank


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
    ((last_good, _),) = read_checkpoints(run_dir / f"iter_{stopped - 1:07d}")
    assert all_finite(last_good)

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
    (applied_tensors, applied), *skipped = read_checkpoints(*(run_dir / f"iter_{iteration:07d}"
                                                              for iteration in (first - 1, first, first + 1)))
    assert all_finite(applied_tensors)
    assert any(name.startswith("optimizer.state.exp_avg_sq.") for name in applied_tensors)
    for iteration, (tensors, common) in zip((first, first + 1), skipped):
        assert common["iteration"] == iteration and tensors.keys() == applied_tensors.keys()
        assert all(same_state(tensors[name], applied_tensors[name]) for name in tensors)
        assert common["optimizer"]["state"]["common_step"] == applied["optimizer"]["state"]["common_step"] == first - 1
        assert common["optimizer"]["param_groups"] == applied["optimizer"]["param_groups"]
        assert common["opt_param_scheduler"] == applied["opt_param_scheduler"]


def _rank_process(launcher, rank: int):
    """The worker of ``rank`` among the children of the torchrun process ``launcher`` (psutil)."""
    (worker,) = [child for child in launcher.children() if child.environ().get("RANK") == str(rank)]
    return worker


def test_sigkill_of_one_rank_mid_save_ends_the_launch_and_the_resume_continues_the_curve(tmp_path, megatron_teacher):
    """SIGKILL to rank 1 while a checkpoint is being written (its iter_ directory exists, the
    tracker does not name it yet), with Megatron's signal handler on as in a preemptible job: the
    other rank stops by itself and the launch ends within a bound, latest_checkpointed_iteration.txt
    still names a complete checkpoint, and a resume from it repeats the uninterrupted run's losses
    (rewriting the half-written iteration on its way)."""
    import psutil

    from megatron_qad.train.checkpoint_checks import check_checkpoint_files
    from megatron_qad.train.checkpointing import resolve_checkpoint

    qad = ["--qad-teacher-load", str(megatron_teacher), "--qad-calibration-iters", "1", "--train-iters", "10",
           "--distributed-timeout-minutes", "1"]
    whole = pretrain_qad(*qad, "--qad-summary", str(tmp_path / "whole.json"))  # the record holds every loss
    run_dir = tmp_path / "run"
    tracker = run_dir / "latest_checkpointed_iteration.txt"
    checkpointed = ["--save", str(run_dir), "--load", str(run_dir), "--save-interval", "2", "--exit-signal-handler"]
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        process = subprocess.Popen(_torchrun_argv(*qad, *checkpointed), env=_env(), cwd=ROOT, stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        saving = None  # a complete checkpoint, then the next save begun (its directory) but not done
        deadline = time.monotonic() + 300
        while saving is None and process.poll() is None and time.monotonic() < deadline:
            text = tracker.read_text().strip() if tracker.is_file() else ""
            done = int(text) if text else 0  # empty: rank 0 is rewriting it
            started = [int(path.name[5:]) for path in run_dir.glob("iter_*")]
            saving = min((iteration for iteration in started if done and iteration > done), default=None)
            time.sleep(0.005)  # a save after the first takes ~0.1 s here
        assert saving is not None, "no save was seen in progress:\n" + log.read_text()[-3000:]
        _rank_process(psutil.Process(process.pid), 1).kill()  # SIGKILL
        killed_at = time.monotonic()
        code = process.wait(timeout=60)
        ended_s = time.monotonic() - killed_at
    finally:
        process.kill()
    output = log.read_text()
    # Rank 0's next collective (the save's gather, or the barrier before the tracker is written)
    # fails at once on the closed gloo connection, and rank 0 ends: it exits 1 by itself, or of the
    # SIGTERM that torchrun's agent sends the remaining workers when that arrives after the failed
    # run gave the exit signals their own handlers back (-15; before, Megatron's handler only set
    # its flag). The agent polls every 0.1 s and SIGKILLs workers 30 s after that SIGTERM
    # (torch.distributed.elastic's default), which bounds the launch whatever the survivor does:
    # 35 s. Measured: 1.8-3.6 s on 2 shared cores (mostly the survivor's traceback and exit).
    assert code != 0 and ended_s < 35, (ended_s, output[-3000:])
    assert re.search(r"rank\s+: 1 \(local_rank: 1\)\n\s+exitcode\s+: -9 ", output), output[-3000:]
    assert re.search(r"rank\s+: 0 \(local_rank: 0\)\n\s+exitcode\s+: (1|-15) ", output), output[-3000:]
    newest = resolve_checkpoint(run_dir)  # the tracker names a complete checkpoint
    check_checkpoint_files(newest)
    resumed_from = int(newest.name[5:])
    assert resumed_from in (saving - 2, saving), (saving, resumed_from)  # saving: the save finished first
    resumed = pretrain_qad(*qad, *checkpointed)
    assert resumed["ptq"] is None
    assert _losses(resumed) == _losses(whole)[resumed_from:]  # bit for bit: a CPU fp32 resume is exact
    assert resumed["final"] == whole["final"]
    assert resolve_checkpoint(run_dir).name == "iter_0000010"
    check_checkpoint_files(run_dir / f"iter_{saving:07d}")  # the half-written one, written again whole
