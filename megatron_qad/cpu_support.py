"""The shims megatron.core 0.19.2 needs on a CPU-only machine: two to build, run and train a GPTModel,
one more to build (not run) the Mamba layers of a hybrid model, one for the small tensors that
megatron.core's pipeline schedules and optimizer allocate on a hard-coded "cuda"
(:func:`_cpu_hard_coded_cuda_tensors`), the optimizer's gradient clipping
(:func:`_cpu_gradient_clipping`), the MoE router's GEMM where Transformer Engine is installed
(:func:`_router_gemm_in_torch`), and the no-op CUDA stream
and synchronize that megatron.core's DistributedDataParallel gradient reduction and
dist_checkpointing's writer call (:class:`_CpuStream`, :func:`_cpu_synchronize`).

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

:func:`apply_training` adds seven for Megatron-LM's training loop (``megatron.training.pretrain``),
each explained where it is installed: ``initialize_megatron`` told that no GPU is fine (the process
groups exist already), the GPU architecture read by the argument checks, the JIT fusion warm-up,
``Module.cuda`` to the CPU device, the DDP set-up's side stream, the rerun state machine's CUDA RNG
state, and the small tensors that ``training``, its checkpointing, its utilities and the rerun state
machine allocate on a hard-coded "cuda".

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


class _CpuStream:
    """Stand-in for ``torch.cuda.current_stream()`` and ``torch.cuda.Stream()`` on the CPU: work
    runs in program order, so there is nothing to wait for.

    megatron.core's ``distributed.param_and_grad_buffer._ParamAndGradBucketGroup.start_grad_sync``
    (reached from ``finalize_model_grads`` -> ``DistributedDataParallel.finish_grad_sync`` every
    step) takes the current stream to wait on CUDA-graph events it finds on parameters; on the CPU
    there are none, and the stream itself is all it needs.
    """

    def __init__(self, device=None, priority: int = 0, **kwargs):
        """Any arguments of ``torch.cuda.Stream`` are accepted and ignored."""

    def wait_event(self, event) -> None:
        """Nothing runs asynchronously on the CPU."""

    def wait_stream(self, stream) -> None:
        """Nothing runs asynchronously on the CPU."""

    def synchronize(self) -> None:
        """Nothing runs asynchronously on the CPU."""


def _cpu_current_stream(device=None) -> _CpuStream:
    return _CpuStream()


def _cpu_synchronize(device=None) -> None:
    """Stand-in for ``torch.cuda.synchronize()`` on the CPU (work is already complete).

    ``dist_checkpointing``'s ``FileSystemWriterAsync.preload_tensors`` calls it before copying
    tensors to be written.
    """


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
            f"on the CPU. Run on a CUDA GPU with mamba-ssm installed (causal-conv1d: the fused path)")

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


def _on_cpu(device):
    """``device`` with a CUDA device replaced by the CPU."""
    if device is not None and torch.device(device).type == "cuda":
        return "cpu"
    return device


class _CpuDeviceTorch(types.ModuleType):
    """``torch`` as seen by a megatron.core module that allocates small tensors on a hard-coded
    ``device="cuda"``: the real module, except that ``zeros`` and ``tensor`` put such tensors on
    the CPU. Every other attribute is torch's own."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device=_on_cpu(device), **kwargs)

    @staticmethod
    def tensor(*args, device=None, **kwargs):
        return torch.tensor(*args, device=_on_cpu(device), **kwargs)


def _cpu_hard_coded_cuda_tensors() -> None:
    """Give the megatron.core modules that allocate on a hard-coded "cuda" a ``torch`` whose
    ``zeros`` / ``tensor`` map that device to the CPU (:class:`_CpuDeviceTorch`).

    * ``pipeline_parallel.schedules``: every schedule starts with ``total_num_tokens =
      torch.zeros([], dtype=torch.int, device="cuda")``, the count of loss tokens that
      ``calculate_per_token_loss`` hands to ``finalize_model_grads``; even a PP=1 schedule fails;
    * ``optimizer.optimizer``: ``MixedPrecisionOptimizer`` and ``FP32Optimizer`` keep their
      found-inf flag and loss scale as ``torch.tensor([...], device='cuda')``;
    * ``optimizer.clip_grads``: the gradient-norm accumulator and the overflow buffer of the
      multi-tensor fallback are ``torch.zeros(1, device='cuda')``;
    * ``utils``: ``local_multi_tensor_l2_norm`` (the gradient norm without Apex or Transformer
      Engine) returns ``torch.tensor([norm], device="cuda")``.
    Only the module's global name ``torch`` is replaced; nothing else of it changes. (The BF16
    mixed-precision optimizer also checks ``param.type()`` against ``'torch.cuda.BFloat16Tensor'``
    and refuses CPU BF16 parameters: CPU training uses fp32 parameters and ``FP32Optimizer``.)
    """
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as megatron_optimizer
    from megatron.core.pipeline_parallel import schedules

    for module in (schedules, megatron_optimizer, clip_grads, utils):
        if not isinstance(module.torch, _CpuDeviceTorch):
            module.torch = _CpuDeviceTorch("torch")


def _cpu_clip_grad_by_total_norm_fp32(parameters, max_norm: float, total_norm: float,
                                      use_decoupled_grad: bool = False) -> None:
    """``optimizer.clip_grads.clip_grad_by_total_norm_fp32`` for CPU parameters.

    megatron.core's version asserts ``param.grad.type() == 'torch.cuda.FloatTensor'`` before
    scaling; this one scales the same gradients (``.grad``, or ``.decoupled_grad``) in place by
    ``min(1, max_norm / (total_norm + 1e-6))``, megatron.core's coefficient.
    """
    parameters = [parameters] if isinstance(parameters, torch.Tensor) else parameters
    attribute = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attribute) for p in parameters if getattr(p, attribute, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if grads and clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)


def _cpu_gradient_clipping() -> None:
    """The chained optimizer's gradient clipping without its CUDA type assertion (see
    :func:`_cpu_clip_grad_by_total_norm_fp32`); ``optimizer.optimizer`` calls it by that name."""
    from megatron.core.optimizer import optimizer as megatron_optimizer

    megatron_optimizer.clip_grad_by_total_norm_fp32 = _cpu_clip_grad_by_total_norm_fp32


def _router_gemm_in_torch() -> None:
    """The MoE router's logits GEMM in torch. With Transformer Engine installed, megatron.core's
    ``moe_utils.RouterGatingLinearFunction`` runs it with TE's cuBLAS GEMM (``te_general_gemm``),
    which needs a GPU; without that name it uses ``torch.mm`` (its own fallback)."""
    from megatron.core.transformer.moe import moe_utils

    moe_utils.te_general_gemm = None


def apply() -> None:
    """Install the shims (idempotent); RuntimeError if this process can see a CUDA device."""
    if torch.cuda.is_available():
        raise RuntimeError(
            "CPU (gloo) runs need a process that sees no GPU, but CUDA is available here; start the "
            "process with CUDA_VISIBLE_DEVICES= (empty) or use the NCCL backend on the GPUs")
    torch.cuda.current_device = _cpu_current_device
    torch.cuda.current_stream = _cpu_current_stream
    torch.cuda.synchronize = _cpu_synchronize
    # initialize_rng_tracker() instantiates the class bound to this module-level name, so every
    # tracker megatron.core creates from now on (including after force_reset) keeps CPU states.
    megatron_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    _allow_mamba_mixer_build()
    _cpu_hard_coded_cuda_tensors()
    _cpu_gradient_clipping()
    _router_gemm_in_torch()


class _GroupedGemmCapableCuda(types.ModuleType):
    """``torch.cuda`` as ``megatron.training.arguments`` sees it on the CPU: torch's own, except
    that ``get_device_capability`` answers (8, 0), the capability ``validate_args`` asks of the
    device under ``--moe-grouped-gemm`` (its GroupedGEMM kernels). On the CPU the experts' grouped
    GEMM is torch's ``grouped_mm``, which runs one matmul per expert (``grouped_experts``)."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def get_device_capability(device=None) -> tuple[int, int]:
        return (8, 0)


class _ArgumentsTorch(types.ModuleType):
    """``torch`` as ``megatron.training.arguments`` sees it on the CPU: torch's own, with
    :class:`_GroupedGemmCapableCuda` as ``cuda`` (its one use of ``torch.cuda``)."""

    cuda = _GroupedGemmCapableCuda("torch.cuda")

    def __getattr__(self, name):
        return getattr(torch, name)


def _no_device_arch() -> int:
    """Stand-in for ``get_device_arch_version`` on the CPU: 0, older than any GPU architecture."""
    return 0


def _no_jit_fusion(tp_size=None) -> None:
    """Stand-in for ``initialize.set_jit_fusion_options`` on the CPU (see :func:`apply_training`)."""


def _no_cuda_rng_state(device="cuda") -> torch.Tensor:
    """Stand-in for ``torch.cuda.get_rng_state`` on the CPU: an empty state (no CUDA generator)."""
    return torch.empty(0, dtype=torch.uint8)


def _set_no_cuda_rng_state(new_state, device="cuda") -> None:
    """Stand-in for ``torch.cuda.set_rng_state`` on the CPU: there is no CUDA generator to set."""


@contextlib.contextmanager
def _cpu_stream_context(stream=None):
    """Stand-in for ``torch.cuda.stream(s)`` on the CPU: the block runs as it is."""
    yield


def _module_cuda_on_cpu(self, device=None):
    """``Module.cuda`` in a process that sees no GPU: a move to the CPU device (what
    :func:`_cpu_current_device` hands out) leaves the module where it is; any other still fails."""
    if device is not None and torch.device(device).type == "cpu":
        return self
    raise RuntimeError("Module.cuda() in a process that sees no GPU (CPU run: megatron_qad.cpu_support)")


def apply_training() -> None:
    """The shims ``megatron.training.pretrain`` needs on the CPU, on top of :func:`apply` (idempotent)."""
    import functools

    from megatron.training import arguments as training_arguments
    from megatron.training import checkpointing as training_checkpointing
    from megatron.training import initialize, training
    from megatron.training.utils import common_utils as training_utils
    from megatron.core import rerun_state_machine

    apply()
    # pretrain() calls initialize_megatron() without allow_no_cuda, which asserts a GPU; the
    # process group and megatron.core's groups are already set up (megatron_qad.parallel).
    if not isinstance(training.initialize_megatron, functools.partial):
        training.initialize_megatron = functools.partial(initialize.initialize_megatron, allow_no_cuda=True)
    # validate_args() reads the GPU's architecture at TP or CP > 1 (CUDA_DEVICE_MAX_CONNECTIONS
    # matters before Blackwell); the CPU counts as "before Blackwell".
    training_arguments.get_device_arch_version = _no_device_arch
    # validate_args() asserts a GPU of compute capability 8+ under --moe-grouped-gemm; the CPU
    # runs the local spec's grouped GEMMs with torch's grouped_mm (see _GroupedGemmCapableCuda).
    if not isinstance(training_arguments.torch, _ArgumentsTorch):
        training_arguments.torch = _ArgumentsTorch("torch")
    # The JIT fusion set-up warms up fused CUDA kernels (bias-GeLU, bias-dropout-add) on random
    # CUDA tensors; the CPU runs none of them.
    training.set_jit_fusion_options = _no_jit_fusion
    # get_model() moves every chunk with module.cuda(torch.cuda.current_device()), the CPU here
    # (see _cpu_current_device); the models are built on the CPU already.
    if torch.nn.Module.cuda is not _module_cuda_on_cpu:
        torch.nn.Module.cuda = _module_cuda_on_cpu
    # get_model() builds the DDP wrappers under a side stream: torch.cuda.Stream(), wait_stream,
    # torch.cuda.stream(...); on the CPU work runs in program order (see _CpuStream).
    torch.cuda.Stream = _CpuStream
    torch.cuda.stream = _cpu_stream_context
    # The rerun state machine saves and restores torch.cuda's RNG state around every step (to
    # replay one); there is no CUDA generator here, so its state is empty.
    torch.cuda.get_rng_state = _no_cuda_rng_state
    torch.cuda.set_rng_state = _set_no_cuda_rng_state
    # Tensors on a hard-coded device="cuda": start-time all-reduces, loss dicts, exit flags
    # (training), the rerun state machine's result checks, and checkpoint bookkeeping.
    for module in (training, training_checkpointing, training_utils, rerun_state_machine):
        if not isinstance(module.torch, _CpuDeviceTorch):
            module.torch = _CpuDeviceTorch("torch")
