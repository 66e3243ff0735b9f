"""Launchers: host lists, the printed srun / torchrun commands, their environment, and their errors.

The scripts run as real subprocesses where that is cheap. Loading a recipe imports torch and
megatron.core (seconds per process): the other checks that load one run in this process, and the
4-node dry run starts before the first test so that its start-up overlaps theirs.
"""

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_qad.launch import (LAUNCH_ENVIRONMENT, LaunchError, build_plan, check_parallel_layout,
                                 default_gpus_per_node, default_nodes, expand_nodelist, main,
                                 torchrun_executable)

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "scripts" / "launch.py"
SBATCH = ROOT / "scripts" / "slurm" / "qad.sbatch"
SINGLE_NODE = ROOT / "scripts" / "torchrun_single_node.sh"
RECIPE = "configs/tiny_cpu.yaml"
FAKE_SLURM = {"SLURM_JOB_NODELIST": "gpu[001-004]", "SLURM_JOB_ID": "1234", "SLURM_NNODES": "4",
              "SLURM_GPUS_ON_NODE": "8"}
NCCL_DEFAULTS = {name: value for name, (value, _) in LAUNCH_ENVIRONMENT.items()}


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
    assert out.startswith("# this machine: 1 node x 2 GPUs = 2 ranks")
    assert _command(out) == [torchrun_executable(), "--standalone", "--nproc-per-node", "2",
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


@pytest.mark.parametrize("script, code", [("exit 3", 3), ("kill -TERM $$", 128 + 15)])
def test_launch_runs_the_command_and_returns_its_exit_status(clean_env, capfd, tmp_path, script, code):
    _executable(tmp_path / "srun", f'echo "srun $* NCCL_DEBUG=$NCCL_DEBUG"\n{script}\n')
    clean_env.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    for name, value in FAKE_SLURM.items():
        clean_env.setenv(name, value)
    assert main([RECIPE, "model.num_layers=2"]) == code
    *_, printed, ran = capfd.readouterr().out.splitlines()
    assert printed.startswith("srun --nodes 4 ") and ran == printed + " NCCL_DEBUG=WARN"


def test_four_node_dry_run_prints_srun_torchrun_and_nccl_environment(four_node_dry_run):
    """After the tests above, which load the recipe in this process while the dry run starts."""
    stdout, stderr = four_node_dry_run.communicate(timeout=120)
    assert four_node_dry_run.returncode == 0, stderr
    assert stdout.startswith("# SLURM job 1234: 4 node(s) x 8 GPUs = 32 ranks, rendezvous at gpu001:29734\n")
    assert _command(stdout) == [
        "srun", "--nodes", "4", "--ntasks-per-node", "1", "--kill-on-bad-exit=1",
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
        check_parallel_layout(RECIPE, ["parallel.expert_model_parallel_size=4"], world_size=2)
    with pytest.raises(LaunchError, match=r"'parallel.tensor_model_parallel_size' \(3\)"):
        check_parallel_layout(RECIPE, ["parallel.tensor_model_parallel_size=3"], world_size=3)
    check_parallel_layout(RECIPE, ["parallel.tensor_model_parallel_size=2"], world_size=4)


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
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'PATH="{venv / "bin"}:$PATH"\n')
    _executable(venv / "bin" / "python", 'pwd\nprintf "%s\\n" "$@"\n')
    result = _run(["bash", str(SBATCH), RECIPE, "model.num_layers=2", "--dry-run"],
                  {**FAKE_SLURM, "QAD_VENV": str(venv), "SLURM_SUBMIT_DIR": str(ROOT)}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(ROOT), "scripts/launch.py", RECIPE, "model.num_layers=2",
                                          "--dry-run"]
    usage = _run(["bash", str(SBATCH)])
    assert usage.returncode == 2 and "usage: sbatch" in usage.stderr
