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
