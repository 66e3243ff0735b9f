"""The shims megatron.core 0.19.2 needs on a CPU-only machine: two to build, run and train a GPTModel,
one more to build (not run) the Mamba layers of a hybrid model, and one to drive a model through
megatron.core's pipeline schedules (:func:`_cpu_schedule_token_counter`).

Everything else that would touch CUDA is avoided by configuration, in :mod:`megatron_qad.models`:
``use_cpu_initialization=True`` (weights are drawn on the CPU and scattered to TP shards), the local
(non Transformer Engine) layer spec, the ``allgather`` MoE token dispatcher
(``MoEAlltoAllTokenDispatcher.__init__`` creates a ``torch.cuda.Stream``), an explicit causal
attention mask (``transformer.utils.get_default_causal_mask``, used when the mask is None, builds it
with ``device="cuda"``), and a norm that accepts sequence parallelism. Pipeline-parallel p2p on the
CPU is kept off ``torch.cuda.synchronize()`` by configuration too, in
:func:`megatron_qad.distill.pipeline.prepare_pipeline_config`: ``p2p_communication._communicate``
synchronizes when ``batch_p2p_comm and batch_p2p_sync`` (both megatron.core defaults) and
``_communicate_shapes`` when ``variable_seq_lengths``; on the CPU ``batch_p2p_sync=False`` and
``variable_seq_lengths=False`` are set (gloo's ``batch_isend_irecv`` needs no device sync).

:func:`apply` installs the shims for the life of the process; :mod:`megatron_qad.parallel` calls
it when the process runs on the CPU. It refuses to run where CUDA is available: there the patched
``torch.cuda.current_device`` would also feed torch's own CUDA code (torch.compile's device
properties, Triton's stream lookup) and break it. A CPU run on a GPU machine hides the GPUs from
the process first (``CUDA_VISIBLE_DEVICES=``). Where CUDA is unavailable every patched call would
otherwise raise "Found no NVIDIA driver", so no code path that works without the shims changes.

Hybrid (Mamba) models: ``ssm.mamba_mixer.MambaMixer`` needs mamba_ssm and einops to be built, and
mamba_ssm's Triton kernels plus causal_conv1d's CUDA kernel to run; neither kernel works on a CPU,
and megatron.core has no torch fallback for the chunked SSD scan of a training or prefill forward.
:func:`apply` therefore makes the Mixer *buildable* (parameters allocated and initialised exactly as
megatron.core does) and makes its forward fail with a message that says so; see
:func:`_allow_mamba_mixer_build`.

Not covered: activation recomputation (``tensor_parallel.random.CheckpointFunction`` saves and
restores the CUDA RNG state through ``_get_cuda_rng_state``) and the alltoall / flex dispatchers.
"""

import contextlib
import types

import torch
import torch.nn.functional as F
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


class GatedRMSNorm(torch.nn.Module):
    """Torch version of mamba_ssm's gated, grouped RMSNorm (``ops.triton.layernorm_gated.RMSNorm``).

    ``MambaMixer`` normalises the SSM output with ``ExtendedRMSNorm``, a subclass of mamba_ssm's
    Triton ``RMSNorm``; without mamba_ssm, ``ssm.mamba_mixer`` binds that base class to a
    ``MagicMock``, so the "norm" would be a mock and its weight no parameter at all. This module
    has the same constructor, the same single parameter ``weight`` [hidden_size] (ones, no bias),
    the same tensor-parallel checkpoint sharding (dim 0), and computes what mamba_ssm's reference
    ``rms_norm_ref`` does, in fp32: with gate ``z`` and ``norm_before_gate=False`` (the only setting
    ``MambaMixer`` accepts), ``out = rmsnorm_g(x * silu(z)) * weight``, where ``rmsnorm_g``
    normalises each group of ``group_size`` channels by its own root mean square.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.group_size = hidden_size if group_size is None else group_size
        self.norm_before_gate = norm_before_gate
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        if z is not None and not self.norm_before_gate:
            x = x * F.silu(z.float())
        groups = x.unflatten(-1, (-1, self.group_size))
        groups = groups * torch.rsqrt(groups.square().mean(dim=-1, keepdim=True) + self.eps)
        out = groups.flatten(-2) * self.weight.float()
        if z is not None and self.norm_before_gate:
            out = out * F.silu(z.float())
        return out.to(dtype)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Shard ``weight`` along dim 0 over the TP group, as ``ssm.mamba_mixer.ExtendedRMSNorm`` does."""
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import (ensure_metadata_has_dp_cp_group,
                                                     make_sharded_tensors_for_checkpoint)

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        # MambaMixer sets tp_group after construction.
        tp_group = getattr(self, "tp_group", None)
        if tp_group is None:
            tp_group = parallel_state.get_tensor_model_parallel_group()
        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix,
                                                   {"weight": 0}, sharded_offsets, tp_group=tp_group,
                                                   dp_cp_group=metadata["dp_cp_group"])


def _mamba_forward_unavailable(name: str):
    """A stand-in for ``name``, a function only MambaMixer's forward calls, saying why it cannot run."""

    def unavailable(*args, **kwargs):
        raise NotImplementedError(
            f"'{name}' is not available on this CPU: megatron.core's MambaMixer runs the Mamba2 SSD "
            f"scan through mamba_ssm's Triton kernels (mamba_split_conv1d_scan_combined, "
            f"mamba_chunk_scan_combined) and causal_conv1d's CUDA convolution; megatron-core 0.19.2 "
            f"has no torch fallback for them, so the Mamba layers of a hybrid model cannot run forward "
            f"on the CPU. Run on a CUDA GPU with mamba-ssm and causal-conv1d installed")

    unavailable.__name__ = name
    return unavailable


def _allow_mamba_mixer_build() -> None:
    """Let ``ssm.mamba_mixer.MambaMixer`` be built on the CPU without mamba_ssm (a no-op with it).

    ``MambaMixer.__init__`` raises ImportError unless the module-level flags ``HAVE_MAMBA_SSM`` and
    ``HAVE_EINOPS`` are true, although construction uses neither mamba_ssm (except the gated norm
    class) nor einops. Here, where mamba_ssm is missing:
      * ``HAVE_MAMBA_SSM`` is set, so construction proceeds; its other parameters (conv1d, dt_bias,
        A_log, D) are plain torch tensors allocated on ``torch.cuda.current_device()`` (the CPU, by
        the shim above) under the tracker's RNG fork;
      * ``ExtendedRMSNorm`` becomes :class:`GatedRMSNorm`, a real module with the same parameter;
      * ``mamba_split_conv1d_scan_combined`` (the training forward, ``use_mamba_mem_eff_path``)
        and ``mamba_chunk_scan_combined`` (the other path), which mamba_ssm's absence leaves as
        None and the forward would call as ``None(...)``, raise NotImplementedError saying why;
      * without einops (which megatron-core lists only in its ``dev`` extra, and which mamba-ssm
        brings along on GPU machines), the ``HAVE_EINOPS`` flags of ``ssm.mamba_mixer`` and
        ``ssm.mamba_context_parallel`` (``MambaContextParallel.__init__`` checks it too) are set,
        and their ``rearrange`` / ``repeat``, used only in forward (the Mixer's first statement),
        raise the same NotImplementedError.
    """
    from megatron.core.ssm import mamba_context_parallel, mamba_mixer

    if mamba_mixer.HAVE_MAMBA_SSM and mamba_mixer.mamba_split_conv1d_scan_combined is not None:
        return  # a real mamba_ssm, or the shims are already in place
    mamba_mixer.HAVE_MAMBA_SSM = True
    mamba_mixer.ExtendedRMSNorm = GatedRMSNorm
    for name in ("mamba_split_conv1d_scan_combined", "mamba_chunk_scan_combined"):
        setattr(mamba_mixer, name, _mamba_forward_unavailable(name))
    for module, names in ((mamba_mixer, ("rearrange", "repeat")), (mamba_context_parallel, ("repeat",))):
        if not module.HAVE_EINOPS:
            module.HAVE_EINOPS = True
            for name in names:
                setattr(module, name, _mamba_forward_unavailable(f"einops.{name}"))


class _SchedulesTorch(types.ModuleType):
    """``torch`` as seen by ``pipeline_parallel.schedules``: the real module, except ``zeros``
    (see :func:`_cpu_schedule_token_counter`)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        if device is not None and torch.device(device).type == "cuda":
            device = "cpu"
        return torch.zeros(*args, device=device, **kwargs)


def _cpu_schedule_token_counter() -> None:
    """Let megatron.core's pipeline schedules allocate their token counter on the CPU.

    Every schedule of ``pipeline_parallel/schedules.py`` (``forward_backward_no_pipelining``,
    ``forward_backward_pipelining_with_interleaving``, ``..._without_interleaving``) starts with
    ``total_num_tokens = torch.zeros([], dtype=torch.int, device="cuda")``, the count of loss tokens
    that ``calculate_per_token_loss`` hands to ``finalize_model_grads``; a hard-coded device, not
    ``torch.cuda.current_device()``, so even a PP=1 schedule fails on the CPU with "Found no NVIDIA
    driver". The module's global ``torch`` is replaced by a proxy whose ``zeros`` maps a "cuda"
    device to the CPU and which forwards every other attribute to torch; nothing else of the module
    changes (it makes no other CUDA allocation on the paths our runs take).
    """
    from megatron.core.pipeline_parallel import schedules

    if not isinstance(schedules.torch, _SchedulesTorch):
        schedules.torch = _SchedulesTorch("torch")


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
    _allow_mamba_mixer_build()
    _cpu_schedule_token_counter()
