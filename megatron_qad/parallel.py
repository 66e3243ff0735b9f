"""Process-group set-up: torch.distributed, megatron.core model-parallel groups, and RNG seeding.

Launch modes:
  * ``torchrun`` / SLURM wrappers set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (and LOCAL_RANK):
    the process group is initialised from them (``env://``);
  * without them, a single process (rank 0 of 1) on a free localhost port, e.g. ``megatron-qad
    inspect`` on a laptop.
The backend is NCCL with one GPU per process when CUDA is available, else gloo on the CPU, where
:mod:`megatron_qad.cpu_support` is applied.
"""

import contextlib
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from . import cpu_support
from .config import ConfigError, ParallelConfig

_ENV_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class ParallelContext:
    """Where this process sits. ``device`` is where its model and batches live."""

    rank: int
    world_size: int
    local_rank: int
    data_parallel_size: int
    backend: str
    device: torch.device


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free when asked (another process may take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_world_size(parallel_cfg: ParallelConfig, world_size: int) -> int:
    """Return the data-parallel size; raise ConfigError if the layout does not tile ``world_size``."""
    tp, pp = parallel_cfg.tensor_model_parallel_size, parallel_cfg.pipeline_model_parallel_size
    cp, ep = parallel_cfg.context_parallel_size, parallel_cfg.expert_model_parallel_size
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise ConfigError(
            f"'parallel.tensor_model_parallel_size' ({tp}) x 'parallel.pipeline_model_parallel_size' "
            f"({pp}) x 'parallel.context_parallel_size' ({cp}) = {model_parallel} does not divide the "
            f"world size ({world_size}); launch a multiple of {model_parallel} processes or change "
            f"these sizes")
    # Expert layers use tensor parallelism of the same size (megatron.core's default).
    expert_parallel = tp * ep * pp
    if world_size % expert_parallel:
        raise ConfigError(
            f"'parallel.tensor_model_parallel_size' ({tp}) x 'parallel.expert_model_parallel_size' "
            f"({ep}) x 'parallel.pipeline_model_parallel_size' ({pp}) = {expert_parallel} does not "
            f"divide the world size ({world_size}); launch a multiple of {expert_parallel} processes "
            f"or change these sizes")
    return world_size // model_parallel


def _init_process_group(backend: str, timeout_minutes: int) -> None:
    """Initialise the default process group from torchrun variables, or as a single process;
    its collectives fail after ``timeout_minutes`` without the other ranks."""
    present = [key for key in _ENV_KEYS if key in os.environ]
    if present and len(present) < len(_ENV_KEYS):
        missing = [key for key in _ENV_KEYS if key not in os.environ]
        raise RuntimeError(f"the launcher set {', '.join(present)} but not {', '.join(missing)}; "
                           f"launch with torchrun (which sets all of {', '.join(_ENV_KEYS)}) or none")
    if present:
        dist.init_process_group(backend=backend, init_method="env://",
                                timeout=timedelta(minutes=timeout_minutes))
    else:
        dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                                rank=0, world_size=1, timeout=timedelta(minutes=timeout_minutes))


def initialize(parallel_cfg: ParallelConfig, backend: str | None = None, seed: int = 1234) -> ParallelContext:
    """Set up torch.distributed and megatron.core's parallel groups; seed the RNGs.

    backend: "nccl" (one GPU per process, LOCAL_RANK picks it) or "gloo" (the CPU, in a process
    that sees no GPU); None picks NCCL when CUDA is available, else gloo. An already initialised
    default process group is reused as it is (its timeout too); the ones created here time out
    after ``parallel_cfg.distributed_timeout_minutes``. seed: seeds the default torch generator and
    megatron.core's data-, tensor- and expert-parallel RNG streams (``model_parallel_cuda_manual_seed``).
    Raises ConfigError when the parallel sizes do not tile the world size.
    """
    created = not dist.is_initialized()
    if created:
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    else:
        backend = dist.get_backend()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        cpu_support.apply()
        device = torch.device("cpu")
    if created:
        _init_process_group(backend, parallel_cfg.distributed_timeout_minutes)
    world_size, rank = dist.get_world_size(), dist.get_rank()
    try:
        data_parallel_size = check_world_size(parallel_cfg, world_size)
    except ConfigError:
        if created:
            dist.destroy_process_group()
        raise
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel_cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel_cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=_virtual_size(parallel_cfg),
        context_parallel_size=parallel_cfg.context_parallel_size,
        expert_model_parallel_size=parallel_cfg.expert_model_parallel_size,
        distributed_timeout_minutes=parallel_cfg.distributed_timeout_minutes,
    )
    torch.manual_seed(seed)
    # force_reset_rng: a tracker created before cpu_support.apply() would still hold CUDA states.
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    return ParallelContext(rank=rank, world_size=world_size, local_rank=local_rank,
                           data_parallel_size=data_parallel_size, backend=backend, device=device)


def _virtual_size(parallel_cfg: ParallelConfig) -> int | None:
    """megatron.core's spelling of "no virtual pipeline" is None, ours is 1."""
    size = parallel_cfg.virtual_pipeline_model_parallel_size
    return size if size > 1 else None


def destroy(keep_process_group: bool = False) -> None:
    """Tear down megatron.core's parallel groups and (unless ``keep_process_group``) the default
    process group (idempotent)."""
    parallel_state.destroy_model_parallel()
    if dist.is_initialized() and not keep_process_group:
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(backend: str | None = None, timeout_minutes: int = 10):
    """The default process group for the block (torchrun's variables, or one process), for
    several runs in one process: :func:`initialize` reuses it, and it is destroyed after the
    block only if the block created it. ``backend``: as in :func:`initialize`; its collectives
    fail after ``timeout_minutes`` without the other ranks."""
    created = not dist.is_initialized()
    if created:
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "gloo":
            cpu_support.apply()
        _init_process_group(backend, timeout_minutes)
    try:
        yield
    finally:
        if created and dist.is_initialized():
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
