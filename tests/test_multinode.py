"""Two nodes on one machine: ``scripts/slurm/qad.sbatch`` runs the launcher, which starts one real
``torchrun`` per node through ``srun`` (one rank each, c10d rendezvous on localhost), and the
ranks run QAD of the tiny CPU recipe at DP=2 across the two nodes. Then the requeue path: SLURM's
warning signal (SIGUSR1, the sbatch's ``--signal``) to every process of the job step, as
slurmstepd sends it; the run saves and stops, the launcher exits 75, the batch script requeues the
job; the relaunched job resumes and finishes with the uninterrupted run's losses and weights.

Stand-ins, written as small scripts on PATH: ``srun`` (starts its command once per node on this
machine, records the tasks' pids, ends the others when one fails: ``--kill-on-bad-exit``),
``scontrol`` (records its arguments) and ``python`` (this interpreter). torchrun, the rendezvous,
the gloo process group and the training are real. Three launches of two ranks (the first also
trains the teacher): 115 s of CPU time in all (2026-12-06), so 1-2 minutes on 2 idle cores; 6
minutes at a load average of 20-47 on 2 shared cores.
"""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from test_launch import FAKE_SLURM, SBATCH, _clean_environ, _executable
from torchrun_helpers import json_lines, read_checkpoints, same_state

ROOT = Path(__file__).resolve().parents[1]
TRAIN_ITERS = 6
RECIPE = ["configs/tiny_cpu.yaml", "model.num_layers=2", "model.seq_length=32", "training.global_batch_size=4",
          "training.micro_batch_size=2", "training.log_interval=1", "training.eval_iters=1",
          "distill.calibration_iters=1", "training.lr_warmup_iters=1", f"training.train_iters={TRAIN_ITERS}",
          "teacher.pretrain_iters=2"]
"""The tiny CPU recipe, shrunk; micro-batches of 2 in global batches of 4: one per rank at DP=2."""

SRUN = """#!/usr/bin/env bash
nodes=1
while [ $# -gt 0 ]; do
  case $1 in
    --nodes) nodes=$2; shift 2 ;;
    --ntasks-per-node) shift 2 ;;
    --kill-on-bad-exit=*) shift ;;
    *) break ;;
  esac
done
pids=()
for ((node = 0; node < nodes; node++)); do
  SLURM_NODEID=$node "$@" &
  pids+=($!)
done
echo "${pids[*]}" > "$SRUN_TASKS"
status=0
for _ in "${pids[@]}"; do
  wait -n
  code=$?
  if [ $code -ne 0 ] && [ $status -eq 0 ]; then
    status=$code
    kill "${pids[@]}" 2>/dev/null
  fi
done
exit $status
"""
"""srun's stand-in: its command once per node (``--nodes``), all here; its status is the first
failure's, which ends the other tasks (srun's ``--kill-on-bad-exit=1``)."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _cluster(tmp_path: Path) -> dict[str, str]:
    """The environment of a 2-node job on this machine: the stand-ins first on PATH, the SLURM
    variables of the allocation, no GPU."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(SRUN)
    (bin_dir / "srun").chmod(0o755)
    _executable(bin_dir / "scontrol", 'echo "scontrol $*" >> "$SCONTROL_LOG"\n')
    _executable(bin_dir / "python", f'exec "{sys.executable}" "$@"\n')
    return _clean_environ({**FAKE_SLURM, "SLURM_JOB_NODELIST": "localhost,localhost", "SLURM_NNODES": "2",
                           "SLURM_GPUS_ON_NODE": "1", "SLURM_SUBMIT_DIR": str(ROOT), "CUDA_VISIBLE_DEVICES": "",
                           "OMP_NUM_THREADS": "1",  # two "nodes" share the cores: one thread per rank
                           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                           "SRUN_TASKS": str(tmp_path / "srun_tasks"), "SCONTROL_LOG": str(tmp_path / "scontrol.log")})


def _sbatch_command(tmp_path: Path, save: str) -> list[str]:
    """The batch script as SLURM runs it for ``sbatch --nodes 2 scripts/slurm/qad.sbatch RECIPE ...``."""
    return ["bash", str(SBATCH), *RECIPE, f"teacher.checkpoint={tmp_path / 'teacher'}",
            f"checkpoint.save={tmp_path / save}", "--master-port", str(_free_port())]


def _job(tmp_path: Path, save: str, env: dict[str, str]) -> str:
    """Run the batch script to its end; its output (it must exit 0)."""
    result = subprocess.run(_sbatch_command(tmp_path, save), cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=420)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout + result.stderr


def _warned_job(tmp_path: Path, save: str, env: dict[str, str], after_iteration: int) -> str:
    """Run the batch script and, once iteration ``after_iteration`` is logged, send SIGUSR1 to every
    process of the job step (the tasks srun started and all their descendants: torchrun, the rank,
    the rank's helper processes), not to the batch step; its output (it must exit 0)."""
    process = subprocess.Popen(_sbatch_command(tmp_path, save), cwd=tmp_path, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines, signalled = [], []
    try:
        deadline = time.monotonic() + 420
        for line in process.stdout:
            lines.append(line)
            if not signalled and re.match(rf" \[.*\] iteration +{after_iteration}/ +{TRAIN_ITERS} \|", line):
                tasks = [psutil.Process(int(pid)) for pid in (tmp_path / "srun_tasks").read_text().split()]
                signalled = [member for task in tasks for member in (task, *task.children(recursive=True))]
                for member in signalled:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        member.send_signal(signal.SIGUSR1)
            assert time.monotonic() < deadline, "".join(lines[-40:])
        code = process.wait(timeout=60)
    finally:
        process.kill()
    output = "".join(lines)
    assert signalled and code == 0, output[-4000:]
    return output


def _summary(output: str) -> dict:
    """The QAD run's summary: its ``summary {...}`` line (the last: a teacher trained first prints
    its own before it), completed from the record file it names."""
    summary = json_lines(output, "summary ")[-1]
    if "record" in summary:
        summary = {**json.loads((ROOT / summary["record"]).read_text()), **summary}  # the run's cwd: ROOT
    return summary


def _losses(output: str) -> dict[int, float]:
    """The training loss of every QAD iteration the run made (Megatron's log lines average a
    launch's first two iterations: Megatron does not reset its sums after the first one)."""
    return {line["iteration"]: line["loss"] for line in _summary(output)["train"]}


def test_two_nodes_train_and_a_warned_job_requeues_and_resumes_to_the_same_end(tmp_path):
    env = _cluster(tmp_path)
    whole = _job(tmp_path, "whole", env)
    assert "rendezvous at localhost:" in whole and "2 node(s) x 1 GPUs = 2 ranks" in whole
    assert sorted(_losses(whole)) == list(range(1, TRAIN_ITERS + 1))
    assert not (tmp_path / "scontrol.log").exists()

    stopped = _warned_job(tmp_path, "requeued", env, after_iteration=2)
    match = re.search(rf"the run stopped at iteration (\d+) of {TRAIN_ITERS}; the same command resumes it", stopped)
    assert match, stopped[-4000:]
    stopped_at = int(match[1])
    assert 2 <= stopped_at < TRAIN_ITERS and _summary(stopped)["stopped_at"] == stopped_at
    assert "qad.sbatch: requeueing job 1234 (requeue 1 of at most 20)" in stopped
    assert (tmp_path / "scontrol.log").read_text() == "scontrol requeue 1234\n"
    assert _losses(stopped) == {it: loss for it, loss in _losses(whole).items() if it <= stopped_at}

    resumed = _job(tmp_path, "requeued", {**env, "SLURM_RESTART_COUNT": "1"})
    assert _losses(resumed) == {it: loss for it, loss in _losses(whole).items() if it > stopped_at}
    assert _summary(resumed)["final"] == _summary(whole)["final"]
    assert (tmp_path / "scontrol.log").read_text() == "scontrol requeue 1234\n"  # finished: not requeued
    last = f"iter_{TRAIN_ITERS:07d}"
    (a, _), (b, _) = read_checkpoints(tmp_path / "whole" / last, tmp_path / "requeued" / last)
    assert a.keys() == b.keys() and all(same_state(a[name], b[name]) for name in a)  # weights and Adam state
