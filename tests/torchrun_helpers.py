"""Run a module or script under torchrun, as users launch jobs, and read the checkpoints it writes."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from distributed_helpers import run_distributed

ROOT = Path(__file__).resolve().parents[1]


def torchrun_command(processes: int, *argv: str) -> list[str]:
    """``torchrun --standalone --nproc-per-node PROCESSES argv...`` (this interpreter's torch)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *argv]


def torchrun(processes: int, *argv: str, timeout_s: float = 420) -> str:
    """:func:`torchrun_command` with no visible GPU, from the repository root; returns stdout (the
    assertion message carries the end of stderr on failure)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(torchrun_command(processes, *argv), env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout_s)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def json_lines(stdout: str, prefix: str = "") -> list[dict]:
    """The JSON objects on the lines of ``stdout`` that start with ``prefix`` + "{"."""
    return [json.loads(line.removeprefix(prefix)) for line in stdout.splitlines()
            if line.startswith(prefix + "{")]


def read_summary(stdout: str) -> dict:
    """A run's summary: its one ``summary {...}`` line on ``stdout`` and, where that line names the
    run's record file, the whole record (PTQ and final metrics, every iteration's metrics, ...)."""
    (summary,) = json_lines(stdout, "summary ")
    if "record" in summary:
        summary = {**json.loads((ROOT / summary["record"]).read_text()), **summary}
    return summary


PRETRAIN_QAD = ROOT / "scripts" / "pretrain_qad.py"

GPT_STYLE_FLAGS = [
    "--group-query-attention", "--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
    "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--hidden-dropout", "0",
    "--attention-dropout", "0", "--tokenizer-type", "NullTokenizer", "--mock-data", "--lr-decay-style", "cosine",
    "--log-interval", "1", "--eval-iters", "1", "--eval-interval", "1000", "--num-workers", "0",
    "--calculate-per-token-loss", "--ckpt-format", "torch_dist", "--seed", "1234", "--transformer-impl", "local",
]
"""The Megatron-LM flags the script's tests share, whatever their sizes: a Llama-style GPT (GQA,
SwiGLU, RoPE, RMSNorm, no biases, untied output layer, no dropout) on Megatron's mock data with
NullTokenizer, cosine LR, a log line per iteration, per-token loss, torch_dist checkpoints,
megatron.core's local layers."""


def script_env(**settings: str) -> dict:
    """The environment for a script run from the repository: ``os.environ`` with the repository
    first on PYTHONPATH (the entries already there kept), plus ``settings``."""
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": python_path, **settings}


def pretrain_qad_command(processes: int, *argv: str) -> list[str]:
    """``torchrun --standalone --nproc-per-node PROCESSES scripts/pretrain_qad.py argv...``."""
    return torchrun_command(processes, str(PRETRAIN_QAD), *argv)


def run_pretrain_qad(processes: int, argv: list[str], env: dict, expect: tuple[int, ...] = (0,),
                     timeout_s: float = 600) -> dict:
    """Run :func:`pretrain_qad_command` from the repository root; its summary (:func:`read_summary`),
    with the run's stdout under "stdout". The exit code must be one of ``expect`` (the assertion message
    carries the lines naming an error and the ends of stdout and stderr)."""
    result = subprocess.run(pretrain_qad_command(processes, *argv), env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout_s)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]
    assert result.returncode in expect, "\n".join([*errors[-10:], result.stdout[-3000:], result.stderr[-3000:]])
    summary = read_summary(result.stdout)
    summary["stdout"] = result.stdout
    return summary


def _read_checkpoints(directories: list[str]) -> list[tuple[dict, dict]]:
    from megatron.core import dist_checkpointing

    from megatron_qad import parallel
    from megatron_qad.config import ParallelConfig

    parallel.initialize(ParallelConfig(), backend="gloo", seed=0)  # megatron.core's loader asks for a group
    try:
        out = []
        for directory in directories:
            tensors = dist_checkpointing.load_plain_tensors(directory)
            common = dist_checkpointing.load_common_state_dict(directory)
            # load_plain_tensors also hands back the common state's items: kept are the tensors and
            # the serialized sharded objects.
            out.append(({name: value.getvalue() if isinstance(value, io.BytesIO) else value
                         for name, value in tensors.items() if isinstance(value, (torch.Tensor, io.BytesIO))},
                        common))
        return out
    finally:
        parallel.destroy()


def read_checkpoints(*directories: Path) -> list[tuple[dict, dict]]:
    """For each torch_dist checkpoint directory (an ``iter_`` one): (its sharded state by
    megatron.core's keys: model and optimizer tensors, whole and on the CPU, and sharded objects, a
    serialized one as its bytes; its common state: iteration, optimizer step count and param groups,
    LR schedule, ...). Read in one CPU process of its own, so that GPU tests can call it too."""
    (result,) = run_distributed(_read_checkpoints, 1, [str(directory) for directory in directories],
                                timeout_s=300)
    return result


def all_finite(tensors: dict) -> bool:
    """Whether ``tensors`` (name -> tensor or object) holds floating-point tensors, all of them finite."""
    floats = [value for value in tensors.values() if isinstance(value, torch.Tensor) and value.is_floating_point()]
    return bool(floats) and all(bool(torch.isfinite(tensor).all()) for tensor in floats)


def same_state(a, b) -> bool:
    """Whether two values of :func:`read_checkpoints`'s sharded state are equal (tensors bit for bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b
