"""Run a module or script under torchrun on CPU processes, as users launch jobs."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def torchrun(processes: int, *argv: str, timeout_s: float = 420) -> str:
    """``torchrun --standalone --nproc-per-node P argv...`` with no visible GPU, from the repository
    root; returns stdout (the assertion message carries the end of stderr on failure)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *argv]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def json_lines(stdout: str, prefix: str = "") -> list[dict]:
    """The JSON objects on the lines of ``stdout`` that start with ``prefix`` + "{"."""
    return [json.loads(line.removeprefix(prefix)) for line in stdout.splitlines()
            if line.startswith(prefix + "{")]


PRETRAIN_QAD = ROOT / "scripts" / "pretrain_qad.py"


def script_env(**settings: str) -> dict:
    """The environment for a script run from the repository: ``os.environ`` with the repository
    first on PYTHONPATH (the entries already there kept), plus ``settings``."""
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": python_path, **settings}


def pretrain_qad_command(processes: int, *argv: str) -> list[str]:
    """``torchrun --standalone --nproc-per-node PROCESSES scripts/pretrain_qad.py argv...``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
            str(PRETRAIN_QAD), *argv]


def run_pretrain_qad(processes: int, argv: list[str], env: dict, expect: tuple[int, ...] = (0,),
                     timeout_s: float = 600) -> dict:
    """Run :func:`pretrain_qad_command` from the repository root; its one summary line, with the
    run's stdout under "stdout". The exit code must be one of ``expect`` (the assertion message
    carries the lines naming an error and the ends of stdout and stderr)."""
    result = subprocess.run(pretrain_qad_command(processes, *argv), env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout_s)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]
    assert result.returncode in expect, "\n".join([*errors[-10:], result.stdout[-3000:], result.stderr[-3000:]])
    (summary,) = json_lines(result.stdout, "summary ")
    summary["stdout"] = result.stdout
    return summary

