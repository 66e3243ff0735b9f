"""Run test code in several CPU processes that form a torch.distributed (gloo) group.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` fresh interpreters, each with the
variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free port) and
no visible GPU, calls ``fn(*args)`` in each, and returns the per-rank return values. ``fn`` must be
a module-level function (it is pickled by name) and typically starts with
``megatron_qad.parallel.initialize(...)``. If any rank raises, the others are stopped and the
parent raises :class:`ChildProcessError` carrying the failing ranks' tracebacks.

``single_process(parallel_cfg)`` is the in-process counterpart for world size 1.
"""

import contextlib
import os
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from megatron_qad.config import ParallelConfig


def _child(fn, rank: int, world_size: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    out = Path(out_dir)
    try:
        result = fn(*args)
    except BaseException:
        (out / f"error{rank}.txt").write_text(traceback.format_exc())
        raise SystemExit(1)
    # Written to a file, not a pipe: a large result would block the child until the parent reads.
    torch.save(result, out / f"result{rank}.tmp")
    os.replace(out / f"result{rank}.tmp", out / f"result{rank}.pt")


def _failures(out: Path, world_size: int) -> list[str]:
    return [f"--- rank {rank} ---\n{(out / f'error{rank}.txt').read_text()}"
            for rank in range(world_size) if (out / f"error{rank}.txt").exists()]


@contextlib.contextmanager
def _gpu_hidden_from_children():
    """CUDA_VISIBLE_DEVICES= (empty) in the environment that spawned children start with: they
    may touch CUDA while importing, before any code of theirs runs, so setting it there is too late."""
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if saved is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def run_distributed(fn, world_size: int, *args, timeout_s: float = 120.0) -> list:
    """Run ``fn(*args)`` on ranks 0..world_size-1 (separate processes); return their results by rank.

    Results travel through ``torch.save`` (tensors, dicts, numbers...). Raises ChildProcessError with
    the children's tracebacks if a rank fails, TimeoutError after ``timeout_s`` seconds.
    """
    from megatron_qad.parallel import free_port

    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="megatron_qad_dist_") as out_dir:
        out = Path(out_dir)
        port = free_port()
        processes = [context.Process(target=_child, args=(fn, rank, world_size, port, out_dir, args),
                                     daemon=True) for rank in range(world_size)]
        with _gpu_hidden_from_children():
            for process in processes:
                process.start()
        deadline = time.monotonic() + timeout_s
        try:
            while any(p.is_alive() for p in processes):
                if _failures(out, world_size) or any(p.exitcode not in (None, 0) for p in processes):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{fn.__name__} on {world_size} processes did not finish in "
                                       f"{timeout_s:.0f} s\n" + "\n".join(_failures(out, world_size)))
                time.sleep(0.05)
        finally:
            for process in processes:
                if process.is_alive():
                    process.terminate()
                process.join()
        failures = _failures(out, world_size)
        exit_codes = [p.exitcode for p in processes]
        if failures or any(code != 0 for code in exit_codes):
            raise ChildProcessError(f"{fn.__name__} failed on {world_size} processes "
                                    f"(exit codes {exit_codes}):\n" + "\n".join(failures))
        return [torch.load(out / f"result{rank}.pt", weights_only=False) for rank in range(world_size)]


@contextlib.contextmanager
def single_process(parallel_cfg: ParallelConfig | None = None, seed: int = 1234):
    """megatron_qad.parallel initialised in this process as rank 0 of 1 on gloo (the CPU).

    Skips the test where this process sees a GPU: CPU runs need CUDA_VISIBLE_DEVICES= (empty).
    """
    from megatron_qad import parallel  # imported here: spawned children need not load megatron.core

    if torch.cuda.is_available():
        pytest.skip("in-process CPU test: run the CPU suite with CUDA_VISIBLE_DEVICES= to hide the GPU")
    context = parallel.initialize(parallel_cfg or ParallelConfig(), backend="gloo", seed=seed)
    try:
        yield context
    finally:
        parallel.destroy()


@contextlib.contextmanager
def gpu_single_process(seed: int = 1234):
    """megatron_qad.parallel initialised in this process as rank 0 of 1 on NCCL, its device the
    first GPU; skips the test where no GPU is visible."""
    from megatron_qad import parallel

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    context = parallel.initialize(ParallelConfig(), backend="nccl", seed=seed)
    try:
        yield context
    finally:
        parallel.destroy()
