"""Launchers: host lists, the printed srun / torchrun commands, their environment, and their errors;
the signals torchrun ignores, and the requeue of a stopped run by the SLURM batch script.

The scripts run as real subprocesses where that is cheap. Loading a recipe imports torch and
megatron.core (seconds per process): the other checks that load one run in this process, and the
4-node dry run starts before the first test so that its start-up overlaps theirs. No SLURM here:
fake ``srun``, ``scontrol`` and ``python`` stand in, and the signal test sends SIGUSR1 to torchrun
and its rank itself, as slurmstepd does to every process of a job step.
"""

import dataclasses
import inspect
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_qad.checkpoint_tracker import MEGATRON_LATEST
from megatron_qad.config import CheckpointConfig, TrainingConfig
from megatron_qad.launch import (LAUNCH_ENVIRONMENT, TORCHRUN_HANDLED_SIGNALS, LaunchError, build_plan,
                                 check_parallel_layout, default_gpus_per_node, default_nodes,
                                 expand_nodelist, ignoring, load_recipe, main, stopped_early,
                                 torchrun_executable, torchrun_unhandled)

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "scripts" / "launch.py"
SBATCH = ROOT / "scripts" / "slurm" / "qad.sbatch"
SINGLE_NODE = ROOT / "scripts" / "torchrun_single_node.sh"
RECIPE = "configs/tiny_cpu.yaml"
FAKE_SLURM = {"SLURM_JOB_NODELIST": "gpu[001-004]", "SLURM_JOB_ID": "1234", "SLURM_NNODES": "4",
              "SLURM_GPUS_ON_NODE": "8"}
NCCL_DEFAULTS = {name: value for name, (value, _) in LAUNCH_ENVIRONMENT.items()}
IGNORE_USR1 = ["sh", "-c", 'trap "" USR1; exec "$0" "$@"']
"""What the launcher puts before torchrun for the default training.exit_signals (SIGUSR1 unhandled)."""


def _clean_environ(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without SLURM or launch variables, plus ``extra``."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("SLURM_") and name not in LAUNCH_ENVIRONMENT}
    return {**env, **(extra or {})}


def _run(command: list[str], extra_env: dict[str, str] | None = None,
         cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run ``command`` outside any SLURM allocation (plus ``extra_env``), capturing its output."""
    return subprocess.run(command, cwd=cwd, env=_clean_environ(extra_env), capture_output=True,
                          text=True, timeout=120)


def _launch(*args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``scripts/launch.py ARGS`` from the repository root."""
    return _run([sys.executable, str(LAUNCHER), *args], extra_env)


def _command(stdout: str) -> list[str]:
    """The command a dry run printed: its last line, split as the shell would."""
    return shlex.split(stdout.strip().splitlines()[-1])


def _exports(stdout: str) -> dict[str, str]:
    """The ``export NAME=VALUE  # reason`` lines of a dry run."""
    pairs = [shlex.split(line, comments=True)[1].split("=", 1)
             for line in stdout.splitlines() if line.startswith("export ")]
    return dict(pairs)


def _executable(path: Path, body: str) -> Path:
    """Write a /bin/sh script with ``body`` to ``path`` and make it executable."""
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _fake_venv(tmp_path: Path, python_body: str) -> Path:
    """A folder with ``bin/activate`` (puts its bin first on PATH) and a fake ``bin/python``."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'PATH="{venv / "bin"}:$PATH"\n')
    _executable(venv / "bin" / "python", python_body)
    return venv


@pytest.fixture(scope="module", autouse=True)
def four_node_dry_run():
    """``scripts/launch.py`` under a fake 4-node SLURM allocation, started when this module starts."""
    args = [RECIPE, "model.num_layers=2", "--dry-run", "quantization.format=nvfp4_4over6"]
    with subprocess.Popen([sys.executable, str(LAUNCHER), *args], cwd=ROOT, env=_clean_environ(FAKE_SLURM),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        yield process
        process.kill()


@pytest.fixture
def clean_env(monkeypatch):
    """Run main() in this process from the repository root, outside any SLURM allocation."""
    for name in list(os.environ):
        if name.startswith("SLURM_") or name in LAUNCH_ENVIRONMENT:
            monkeypatch.delenv(name)
    monkeypatch.chdir(ROOT)
    return monkeypatch


# ---------------------------------------------------------------------------------------------
# Host lists.


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-03,7],gpu-a[1-2]", ["node01", "node02", "node03", "node7", "gpu-a1", "gpu-a2"]),
    ("gpu[001-004]", ["gpu001", "gpu002", "gpu003", "gpu004"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("login1", ["login1"]),
    ("a1,b2,c3", ["a1", "b2", "c3"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("gpu[3],cpu[10-11]", ["gpu3", "cpu10", "cpu11"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist, message", [
    ("", "empty"), ("n[1-", "unclosed"), ("n]1[", "unbalanced"), ("n[3-1]", "runs backwards"),
    ("n[a-b]", "'a-b' is not a number"), ("a,,b", "empty entry"),
])
def test_expand_nodelist_rejects_malformed_lists(nodelist, message):
    with pytest.raises(LaunchError, match=message):
        expand_nodelist(nodelist)


# ---------------------------------------------------------------------------------------------
# Commands.


def test_single_node_dry_run_is_standalone_torchrun(clean_env, capsys):
    assert main([RECIPE, "model.num_layers=2", "--gpus-per-node", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# this machine: 1 node x 2 GPUs = 2 ranks (torchrun --standalone picks a "
                          "free local port)\n# torchrun ignores SIGUSR1 (training.exit_signals it does not handle)")
    assert _command(out) == [*IGNORE_USR1, torchrun_executable(), "--standalone", "--nproc-per-node", "2",
                             "-m", "megatron_qad.cli", "train", RECIPE, "model.num_layers=2"]
    assert _exports(out) == NCCL_DEFAULTS


def test_master_port_and_preset_variables_win():
    env = {**FAKE_SLURM, "SLURM_JOB_NODELIST": "a7,a8", "NCCL_DEBUG": "INFO"}
    plan = build_plan(RECIPE, [], nodes=2, gpus_per_node=4, env=env, master_port=6000)
    assert plan.command[plan.command.index("--rdzv-endpoint") + 1] == "a7:6000"
    assert plan.environment == {**NCCL_DEFAULTS, "NCCL_DEBUG": "INFO"}
    assert "export NCCL_DEBUG=INFO  # " in plan.format()


def test_sizes_default_to_the_slurm_allocation(monkeypatch, tmp_path):
    assert default_nodes(FAKE_SLURM) == 4 and default_gpus_per_node(FAKE_SLURM) == 8
    assert default_gpus_per_node({"SLURM_GPUS_PER_NODE": "h100:4"}) == 4
    with pytest.raises(LaunchError, match="SLURM_GPUS_ON_NODE='0' is not a positive count; pass --gpus-per"):
        default_gpus_per_node({"SLURM_GPUS_ON_NODE": "0"})
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    assert default_nodes({}) == 1 and default_gpus_per_node({}) == 1
    _executable(tmp_path / "nvidia-smi", "echo 'GPU 0: H100 (UUID: a)'\n"
                                         "echo '  MIG 1g.10gb Device 0: (UUID: b)'\n"
                                         "echo 'GPU 1: H100 (UUID: c)'\n")
    assert default_gpus_per_node({}) == 2


def _fake_srun(monkeypatch, folder: Path, script: str) -> None:
    """Put an ``srun`` on PATH that prints NCCL_DEBUG and its arguments (one a line), then runs
    ``script``; and set the variables of a 4-node allocation."""
    _executable(folder / "srun", f'echo "NCCL_DEBUG=$NCCL_DEBUG"\nprintf "%s\\n" "$@"\n{script}\n')
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    for name, value in FAKE_SLURM.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("script, code", [("exit 3", 3), ("kill -TERM $$", 128 + 15)])
def test_launch_runs_the_command_and_returns_its_exit_status(clean_env, capfd, tmp_path, script, code):
    _fake_srun(clean_env, tmp_path, script)
    assert main([RECIPE, "model.num_layers=2"]) == code
    lines = capfd.readouterr().out.splitlines()
    printed = next(line for line in lines if line.startswith("srun "))
    after = lines[lines.index(printed) + 1:]
    assert after[0] == "NCCL_DEBUG=WARN" and ["srun", *after[1:]] == shlex.split(printed)


def test_four_node_dry_run_prints_srun_torchrun_and_nccl_environment(four_node_dry_run):
    """After the tests above, which load the recipe in this process while the dry run starts."""
    stdout, stderr = four_node_dry_run.communicate(timeout=120)
    assert four_node_dry_run.returncode == 0, stderr
    assert stdout.startswith("# SLURM job 1234: 4 node(s) x 8 GPUs = 32 ranks, rendezvous at gpu001:29734\n")
    assert _command(stdout) == [
        "srun", "--nodes", "4", "--ntasks-per-node", "1", "--kill-on-bad-exit=1", *IGNORE_USR1,
        torchrun_executable(), "--nnodes", "4", "--nproc-per-node", "8",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "gpu001:29734", "--rdzv-id", "1234",
        "-m", "megatron_qad.cli", "train", RECIPE, "model.num_layers=2", "quantization.format=nvfp4_4over6"]
    assert _exports(stdout) == {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "NCCL_DEBUG": "WARN",
                                "NCCL_IB_TIMEOUT": "22", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


# ---------------------------------------------------------------------------------------------
# Errors.


def test_missing_recipe_is_named():
    result = _launch("configs/missing.yaml", "--dry-run")
    assert result.returncode == 2
    assert "recipe 'configs/missing.yaml' not found" in result.stderr


def test_several_nodes_need_a_slurm_allocation():
    result = _launch(RECIPE, "--nodes", "2", "--dry-run")
    assert result.returncode == 2
    assert "--nodes 2 needs a SLURM allocation" in result.stderr
    assert "sbatch --nodes 2 scripts/slurm/qad.sbatch configs/tiny_cpu.yaml" in result.stderr


def test_nodelist_shorter_than_nodes():
    result = _launch(RECIPE, "--dry-run", extra_env={**FAKE_SLURM, "SLURM_JOB_NODELIST": "gpu[001-002]"})
    assert result.returncode == 2
    assert "SLURM_JOB_NODELIST 'gpu[001-002]' has 2 host(s), fewer than --nodes 4" in result.stderr


def test_override_without_value_is_a_usage_error():
    result = _launch(RECIPE, "model.num_layers", "--dry-run")
    assert result.returncode == 2
    assert "'model.num_layers' must look like section.key=value" in result.stderr


def test_world_size_must_tile_the_recipe_layout(clean_env, capsys):
    assert main([RECIPE, "parallel.tensor_model_parallel_size=2", "--gpus-per-node", "3", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "'parallel.tensor_model_parallel_size' (2) x 'parallel.pipeline_model_parallel_size' (1) x " \
           "'parallel.context_parallel_size' (1) = 2 does not divide the world size 3" in err
    with pytest.raises(LaunchError, match=r"'parallel.expert_model_parallel_size' \(4\)"):
        check_parallel_layout(load_recipe(RECIPE, ["parallel.expert_model_parallel_size=4"]).parallel, world_size=2)
    with pytest.raises(LaunchError, match=r"'parallel.tensor_model_parallel_size' \(3\)"):
        check_parallel_layout(load_recipe(RECIPE, ["parallel.tensor_model_parallel_size=3"]).parallel, world_size=3)
    check_parallel_layout(load_recipe(RECIPE, ["parallel.tensor_model_parallel_size=2"]).parallel, world_size=4)


# ---------------------------------------------------------------------------------------------
# Shell scripts.


@pytest.mark.parametrize("script", [SBATCH, SINGLE_NODE], ids=lambda path: path.name)
def test_shell_script_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_single_node_script_calls_the_launcher_with_one_node(tmp_path):
    fake_python = _executable(tmp_path / "python", 'printf "%s\\n" "$@"\n')
    result = _run(["bash", str(SINGLE_NODE), RECIPE, "model.num_layers=2"],
                  {"PYTHON": str(fake_python), "NPROC": "2", "DRY_RUN": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(ROOT / "scripts" / "launch.py"), RECIPE, "model.num_layers=2",
                                          "--nodes", "1", "--gpus-per-node", "2", "--dry-run"]
    result = _run(["bash", str(SINGLE_NODE), RECIPE], {"PYTHON": str(fake_python)})
    assert result.stdout.splitlines()[1:] == [RECIPE, "--nodes", "1"]


def test_sbatch_script_activates_the_venv_and_calls_the_launcher(tmp_path):
    venv = _fake_venv(tmp_path, 'pwd\nprintf "%s\\n" "$@"\n')
    result = _run(["bash", str(SBATCH), RECIPE, "model.num_layers=2", "--dry-run"],
                  {**FAKE_SLURM, "QAD_VENV": str(venv), "SLURM_SUBMIT_DIR": str(ROOT)}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(ROOT), "scripts/launch.py", RECIPE, "model.num_layers=2",
                                          "--dry-run", "--stopped-exit-code", "75"]
    usage = _run(["bash", str(SBATCH)])
    assert usage.returncode == 2 and "usage: sbatch" in usage.stderr


# ---------------------------------------------------------------------------------------------
# Stopping before SLURM's time limit, and requeueing.


def test_sbatch_asks_for_a_warning_signal_the_run_stops_on():
    """The #SBATCH signal is one of the default training.exit_signals, one that the launcher makes
    torchrun ignore, with the lead time docs/LAUNCH.md gives; the job is requeueable and appends to
    its log when requeued (it keeps its job id, so its log name)."""
    directives = re.findall(r"^#SBATCH (\S+)", SBATCH.read_text(), flags=re.MULTILINE)
    warning = next(item for item in directives if item.startswith("--signal="))
    name = "SIG" + re.fullmatch(r"--signal=(\w+)@\d+", warning)[1]
    assert name in torchrun_unhandled(TrainingConfig().exit_signals, {})
    assert f"#SBATCH {warning}" in (ROOT / "docs" / "LAUNCH.md").read_text()
    assert {"--requeue", "--open-mode=append"} <= set(directives)


def test_torchrun_ignores_the_exit_signals_it_does_not_handle():
    from torch.distributed.elastic.multiprocessing.api import PContext

    assert f'"TORCHELASTIC_SIGNALS_TO_HANDLE", "{TORCHRUN_HANDLED_SIGNALS}"' in inspect.getsource(PContext.start)
    assert torchrun_unhandled(["SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"], {}) == ("SIGUSR1", "SIGUSR2")
    assert torchrun_unhandled(["SIGTERM", "SIGINT"], {}) == ()
    handled_elsewhere = {"TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM, SIGUSR1"}
    assert torchrun_unhandled(["SIGINT", "SIGUSR1"], handled_elsewhere) == ("SIGINT",)
    assert ignoring(["SIGUSR1", "SIGUSR2"]) == ["sh", "-c", 'trap "" USR1 USR2; exec "$0" "$@"'] and ignoring([]) == []
    plan = build_plan(RECIPE, [], nodes=1, gpus_per_node=1, env={})
    assert plan.command[0] == torchrun_executable() and "ignores" not in plan.format()


_RANK = """import os, signal, sys, time
print("inherited", signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN, flush=True)
received = []
signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))  # as Megatron's handler does
with open(sys.argv[1], "w") as pid_file:
    pid_file.write(str(os.getpid()))
deadline = time.monotonic() + 60
while not received and time.monotonic() < deadline:
    time.sleep(0.02)
print("stopping on", signal.Signals(received[0]).name if received else None, flush=True)
"""


def test_warning_signal_stops_the_rank_and_torchrun_survives(tmp_path):
    """The launcher's command with a stand-in rank, and the same without the shield: SIGUSR1 to
    torchrun and to its rank (in its own session, as torchrun starts ranks), as slurmstepd sends it
    to every process of the step. Shielded, the rank starts with SIGUSR1 ignored, installs its
    handler, receives the signal and exits 0, and torchrun with it; unshielded, torchrun dies."""
    (tmp_path / "rank.py").write_text(_RANK)
    plan = build_plan(RECIPE, [], nodes=1, gpus_per_node=1, env={})
    runs = {}
    for shield in (("SIGUSR1",), ()):
        command = dataclasses.replace(plan, ignored_signals=shield).command
        command = command[:command.index("-m")] + [str(tmp_path / "rank.py"), str(tmp_path / f"pid{len(shield)}")]
        runs[shield] = subprocess.Popen(command, cwd=tmp_path, env=_clean_environ(), text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        for shield, torchrun in runs.items():
            pid_file = tmp_path / f"pid{len(shield)}"
            while not pid_file.is_file() or not pid_file.read_text():
                if torchrun.poll() is not None:
                    pytest.fail(f"torchrun exited {torchrun.returncode} first: {torchrun.communicate()[0]}")
                assert time.monotonic() < deadline, "no rank started within 60 s"
                time.sleep(0.05)
            for pid in (torchrun.pid, int(pid_file.read_text())):
                os.kill(pid, signal.SIGUSR1)
        shielded, unshielded = (runs[shield].communicate(timeout=60)[0] for shield in runs)
    finally:
        for torchrun in runs.values():
            torchrun.kill()
    assert runs[("SIGUSR1",)].returncode == 0, shielded
    assert "inherited True" in shielded and "stopping on SIGUSR1" in shielded
    assert runs[()].returncode == -signal.SIGUSR1, unshielded


def _tracker(save: Path) -> Path:
    """Megatron's tracker file in the checkpoint folder ``save``, which this creates."""
    save.mkdir(parents=True, exist_ok=True)
    return save / MEGATRON_LATEST


@pytest.mark.parametrize("code, tracker, start, resume, stopped_at", [
    (0, "40", None, True, 40),        # stopped by the signal in the first job
    (0, "80", 40, True, 80),          # ... and in the next, which resumed at 40
    (0, "100", 40, True, None),       # finished
    (1, "40", None, True, None),      # failed (a crash, a non-finite loss): not resumed
    (0, "40", None, False, None),     # checkpoint.resume off: the same command starts over
    (0, "40", 40, True, None),        # nothing newer saved: it would stop in the same place again
    (0, "30", 40, True, None),
    (0, None, None, True, None),      # no checkpoint (e.g. the teacher's training stopped first)
    (0, "release", None, True, None),
])
def test_stopped_early_tells_a_run_to_resume_from_a_finished_or_failed_one(tmp_path, code, tracker, start,
                                                                           resume, stopped_at):
    if tracker is not None:
        _tracker(tmp_path / "run").write_text(tracker)
    checkpoint = CheckpointConfig(save=str(tmp_path / "run"), resume=resume)
    assert stopped_early(code, checkpoint, 100, start) == stopped_at
    assert stopped_early(code, CheckpointConfig(save=None), 100, start) is None


@pytest.mark.parametrize("saves, status, option, code", [
    ("4", "0", "75", 75), ("10", "0", "75", 0), ("4", "1", "75", 1), ("4", "0", None, 0),
])
def test_launcher_exit_status_after_a_stopped_run(clean_env, capfd, tmp_path, saves, status, option, code):
    """A fake srun that saves a checkpoint at iteration ``saves`` and exits ``status``."""
    save = tmp_path / "run"
    _fake_srun(clean_env, tmp_path, f"echo {saves} > {_tracker(save)}\nexit {status}")
    args = [RECIPE, f"checkpoint.save={save}", "training.train_iters=10"]
    assert main(args + (["--stopped-exit-code", option] if option else [])) == code
    resumes = f"the run stopped at iteration 4 of 10; the same command resumes it from '{save}' (exit status 75)"
    assert (resumes in capfd.readouterr().out) == (code == 75)


def _sbatch(tmp_path: Path, status: int, extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run the batch script with a fake python (the launcher) exiting ``status`` and a fake scontrol."""
    venv = _fake_venv(tmp_path, f'echo "launched $*"\nexit {status}\n')
    _executable(venv / "bin" / "scontrol", 'echo "scontrol $*"\n')
    return _run(["bash", str(SBATCH), RECIPE],
                {**FAKE_SLURM, "QAD_VENV": str(venv), "SLURM_SUBMIT_DIR": str(ROOT), **extra_env})


@pytest.mark.parametrize("status, env, code, requeued", [
    (75, {}, 0, True),                                                  # stopped: requeue
    (75, {"SLURM_RESTART_COUNT": "19"}, 0, True),
    (75, {"SLURM_RESTART_COUNT": "20"}, 75, False),                     # default bound reached
    (75, {"SLURM_RESTART_COUNT": "2", "QAD_MAX_REQUEUES": "2"}, 75, False),
    (75, {"QAD_MAX_REQUEUES": "0"}, 75, False),
    (0, {}, 0, False),                                                  # finished
    (1, {}, 1, False),                                                  # a rank failed
    (2, {}, 2, False),                                                  # bad recipe or allocation
    (143, {}, 143, False),                                              # srun killed by SIGTERM
])
def test_sbatch_requeues_a_stopped_run_only(tmp_path, status, env, code, requeued):
    result = _sbatch(tmp_path, status, env)
    assert result.returncode == code, result.stderr
    assert result.stdout.splitlines()[0] == f"launched scripts/launch.py {RECIPE} --stopped-exit-code 75"
    assert ("scontrol requeue 1234" in result.stdout) == requeued
    assert ("not requeued" in result.stderr) == (status == 75 and not requeued)


def test_sbatch_rejects_a_bad_requeue_bound(tmp_path):
    result = _sbatch(tmp_path, 75, {"QAD_MAX_REQUEUES": "ten"})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "qad.sbatch: error: QAD_MAX_REQUEUES='ten' is not a count; set it to 0 or more\n"
