"""The two shims megatron.core 0.19.2 needs to build, run and train a GPTModel on a CPU-only machine.

Everything else that would touch CUDA is avoided by configuration, in :mod:`megatron_qad.models`:
``use_cpu_initialization=True`` (weights are drawn on the CPU and scattered to TP shards), the local
(non Transformer Engine) layer spec, the ``allgather`` MoE token dispatcher
(``MoEAlltoAllTokenDispatcher.__init__`` creates a ``torch.cuda.Stream``), an explicit causal
attention mask (``transformer.utils.get_default_causal_mask``, used when the mask is None, builds it
with ``device="cuda"``), and a norm that accepts sequence parallelism.

:func:`apply` installs the shims for the life of the process; :mod:`megatron_qad.parallel` calls
it when the process runs on the CPU. It refuses to run where CUDA is available: there the patched
``torch.cuda.current_device`` would also feed torch's own CUDA code (torch.compile's device
properties, Triton's stream lookup) and break it. A CPU run on a GPU machine hides the GPUs from
the process first (``CUDA_VISIBLE_DEVICES=``). Where CUDA is unavailable every patched call would
otherwise raise "Found no NVIDIA driver", so no code path that works without the shims changes.

Not covered: activation recomputation (``tensor_parallel.random.CheckpointFunction`` saves and
restores the CUDA RNG state through ``_get_cuda_rng_state``) and the alltoall / flex dispatchers.
"""

import contextlib

import torch
from megatron.core.tensor_parallel import random as megatron_random


def _cpu_current_device() -> torch.device:
    """Stand-in for ``torch.cuda.current_device()`` on machines without CUDA: the CPU.

    megatron.core allocates or moves tensors with ``device=torch.cuda.current_device()`` in code
    that a CPU forward/backward of a GPTModel reaches:
      * ``utils.GlobalMemoryBuffer.get_tensor``: the baddbmm output buffer of the local
        ``DotProductAttention`` and the sequence-parallel all-gather buffers;
      * ``tensor_parallel.mappings._gather_along_first_dim`` / ``_reduce_scatter_along_first_dim``:
        sequence-parallel and MoE all-gather dispatcher communication buffers;
      * ``tensor_parallel.layers.LinearWithGradAccumulationAndAsyncCommunication.backward``: the
        sequence-parallel all-gather of the input in backward;
      * ``transformer.moe.router.Router.gating``: moves CPU router weights "to the GPU";
      * ``models.common.embeddings.rotary_pos_embedding.RotaryEmbedding.get_emb``: moves
        ``inv_freq`` "to the GPU" on the first forward.
    Returning the CPU device keeps all of them on the CPU. A device (not an int index) is returned,
    so a caller that builds ``torch.device("cuda", index)`` from it fails loudly rather than silently.
    """
    return torch.device("cpu")


class CpuRNGStatesTracker(megatron_random.CudaRNGStatesTracker):
    """Megatron's named RNG-state tracker, keeping CPU generator states instead of CUDA ones.

    ``tensor_parallel.random.CudaRNGStatesTracker.add`` seeds a state through
    ``torch.cuda.manual_seed`` / ``torch.cuda.get_rng_state`` and ``fork`` swaps states through
    ``torch.cuda.random.get_rng_state``; both need a CUDA driver. ``model_parallel_cuda_manual_seed``
    registers the data-, tensor- and expert-parallel states through ``add``, and forward passes enter
    ``fork`` around dropout (``DotProductAttention.forward`` always does, even with dropout 0).
    Here each named state is a CPU generator state, and ``fork`` swaps it into the default CPU
    generator for the duration of the block, so dropout inside the block draws from the named stream
    and the default stream resumes where it was afterwards.
    """

    def add(self, name: str, seed: int) -> None:
        """Register state ``name``, seeded with ``seed`` (each name and seed at most once)."""
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"RNG seed {seed} is already registered")
        if name in self.states_:
            raise RuntimeError(f"RNG state '{name}' is already registered")
        self.seeds_.add(seed)
        generator = torch.Generator(device="cpu")
        generator.manual_seed(seed)
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = megatron_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        """Run the block with the CPU generator set to state ``name``; restore it afterwards."""
        if name not in self.states_:
            raise RuntimeError(f"RNG state '{name}' is not registered; call "
                               f"megatron_qad.parallel.initialize first")
        outer_state = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer_state)


def apply() -> None:
    """Install the shims (idempotent); RuntimeError if this process can see a CUDA device."""
    if torch.cuda.is_available():
        raise RuntimeError(
            "CPU (gloo) runs need a process that sees no GPU, but CUDA is available here; start the "
            "process with CUDA_VISIBLE_DEVICES= (empty) or use the NCCL backend on the GPUs")
    torch.cuda.current_device = _cpu_current_device
    # initialize_rng_tracker() instantiates the class bound to this module-level name, so every
    # tracker megatron.core creates from now on (including after force_reset) keeps CPU states.
    megatron_random.CudaRNGStatesTracker = CpuRNGStatesTracker
