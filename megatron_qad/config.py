"""Typed run configuration: dataclasses loaded strictly from a YAML recipe plus ``key=value`` overrides.

A recipe is a mapping of sections (``model``, ``parallel``, ...), each a mapping of keys to values:

    model:
      num_layers: 4
      hidden_size: 128
    parallel:
      tensor_model_parallel_size: 1

Every key must be a field of the section's dataclass and every value must have the field's type;
anything else raises :class:`ConfigError` naming the key path (``model.hidden_size``) and the fix.
Adding a section is adding a dataclass and a field of :class:`QADConfig`; the loader needs no change.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

_SIGNAL_NAMES = {f"SIG{name}" for name in ("TERM", "INT", "USR1", "USR2", "HUP", "QUIT", "ALRM", "XCPU")}
"""Signals ``training.exit_signals`` may name (ones a scheduler or a user sends to stop a job)."""

NVFP4_BLOCK_SIZE = 16
"""NVFP4 quantizes blocks of 16 elements along the GEMM reduction (K) dimension."""


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the key path and how to fix it."""


HYBRID_LAYER_SYMBOLS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
"""Layer symbols of ``model.hybrid_layer_pattern`` (megatron.core's ``hybrid_layer_allocation.Symbols``)."""
HYBRID_PIPE = "|"
"""Pipeline-stage separator in ``model.hybrid_layer_pattern``."""
_UNSUPPORTED_HYBRID_SYMBOLS = {"G": "gated delta net", "D": "DeepSeek sparse attention",
                               "+": "multi-latent attention", "/": "multi-token prediction"}


@dataclass
class ModelConfig:
    """Architecture of a Megatron GPT model (dense or mixture-of-experts) or hybrid Mamba model.

    Sizes are element counts; ``seq_length`` is in tokens. ``num_moe_experts = 0`` builds dense
    MLPs; otherwise every layer's MLP is a MoE layer with ``num_moe_experts`` experts of width
    ``moe_ffn_hidden_size`` (None: same as ``ffn_hidden_size``), top-``moe_router_topk`` routing,
    and a shared expert of width ``moe_shared_expert_intermediate_size`` (0: none), whose output
    ``moe_shared_expert_gate`` scales by ``sigmoid(x @ gate_weight.T)`` (a learned [1, hidden]
    gate, kept in BF16 like the router; Qwen2-MoE has it, and an ungated shared expert exports to
    Qwen2-MoE exactly as a zero gate and a doubled down_proj; Nemotron-H has none).
    Routing: ``moe_router_score_function`` "softmax" (megatron.core's default) or "sigmoid"
    (Nemotron-H / Nemotron 3 Nano, DeepSeek-V3), ``moe_router_enable_expert_bias`` adds a per-expert
    bias to the scores that pick the top-k (sigmoid only; saved in checkpoints),
    ``moe_router_topk_scaling_factor`` multiplies the routing weights (None: 1),
    ``moe_router_pre_softmax`` (softmax only) takes the top-k of the softmax over all experts without
    renormalising them (Qwen2-MoE's ``norm_topk_prob: false``; false: softmax over the top-k logits),
    ``moe_router_num_groups`` / ``moe_router_group_topk`` (null: none) limit each token's experts to
    the ``moe_router_group_topk`` groups (of ``moe_router_num_groups`` equal groups) with the largest
    sums of their top-(topk / group_topk) scores (DeepSeek-V3's ``n_group`` / ``topk_group``), and
    ``moe_router_bias_update_rate`` is the step of megatron.core's aux-loss-free bias update after
    every optimizer step (0, the default here: the student keeps the teacher's bias and routing).
    ``moe_grouped_gemm`` runs each MoE layer's experts as grouped GEMMs: Transformer Engine's
    TEGroupedMLP in the TE spec; in the local spec a SequentialMLP whose experts' GEMMs run as one
    ``torch.nn.functional.grouped_mm`` per linear layer (:mod:`megatron_qad.grouped_experts`; outputs
    within fp32 summation error of the per-expert GEMMs). False gives a SequentialMLP of per-expert
    linear layers. All quantize to the same NVFP4 experts and write the same checkpoint tensors.
    The ``alltoall`` dispatcher needs a GPU.
    ``transformer_impl``: the layer spec of a GPT model, megatron.core's "local" one (any device)
    or "transformer_engine" (Megatron-LM's default: TE linear, fused-norm linear, norm and
    attention layers; needs Transformer Engine and a GPU; hybrid models are built local).
    ``core_attention`` (local spec): "local" is megatron.core's unfused ``DotProductAttention``,
    "sdpa" the same product through PyTorch's fused ``scaled_dot_product_attention``
    (:mod:`megatron_qad.sdpa_attention`: FlashAttention on a GPU, no ``[s, s]`` scores kept;
    no parameters, so checkpoints are the same either way).
    ``activation``: "swiglu" is a gated SiLU MLP (fc1 has 2 x ffn outputs). ``params_dtype`` is
    the dtype of the parameters; ``seed`` fixes their initialisation (normal, std
    ``init_method_std``). ``kv_channels``: the attention head size (None: hidden_size / heads);
    ``add_qkv_bias``: biases on the QKV projection only (Qwen2), ``add_bias_linear`` on all.
    ``norm_epsilon``: the epsilon of every RMSNorm / LayerNorm (megatron.core's default 1e-5;
    Qwen2 uses 1e-6; the Mamba mixers' gated norm always uses 1e-5). ``rotary_base`` is RoPE's
    theta; ``rope_scaling`` applies Llama 3.1's frequency scaling to it with factor
    ``rope_scaling_factor`` (megatron.core's, with low / high frequency factors 1 / 4 and an original
    context of 8192 tokens; GPT models with RoPE only).

    ``hybrid_layer_pattern`` empty builds a GPT model (every layer attention + MLP). Otherwise it
    builds a hybrid model (megatron.core ``HybridModel``, e.g. Nemotron-H / Nemotron 3 Nano) with one
    layer per symbol, in order: ``M`` Mamba2 mixer, ``*`` self-attention (GQA), ``-`` dense MLP of
    width ``ffn_hidden_size``, ``E`` MoE layer (the MoE settings above; MoE only there); each layer
    is one residual block (norm + mixer or MLP). ``|`` may split the pattern into one segment per
    pipeline stage; without it, stages get equal shares. The Mamba2 mixers have ``mamba_num_heads``
    heads (None: ``2 * hidden_size / mamba_head_dim``, megatron's expand factor 2) of width
    ``mamba_head_dim``, SSM state size ``mamba_state_dim`` and ``mamba_num_groups`` B/C groups; their
    inner width ``mamba_num_heads * mamba_head_dim`` is the K dimension of ``out_proj``. Nemotron
    models use ``position_embedding_type: none`` and ``activation: squared_relu``.

    ``heterogeneous_layers_config``: path (relative paths start at the current directory) of a
    DeciLM ``config.json`` (Hugging Face ``nemotron-nas``, e.g. Llama-3.3-Nemotron-Super-49B) whose
    ``block_configs`` give each of the ``num_layers`` layers its own attention (grouped-query
    attention with its own K/V groups, one linear layer, or nothing) and FFN (a SwiGLU MLP of its
    own width, one linear layer, or nothing); see :mod:`megatron_qad.block_configs`. The model is
    then built with megatron.core's heterogeneous layers (dense, local spec, SwiGLU);
    ``num_query_groups`` and ``ffn_hidden_size`` are the defaults the blocks override.
    """

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    seq_length: int
    num_moe_experts: int = 0
    moe_router_topk: int = 2
    moe_router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    moe_router_enable_expert_bias: bool = False
    moe_router_topk_scaling_factor: float | None = None
    moe_router_bias_update_rate: float = 0.0
    moe_router_pre_softmax: bool = False
    moe_router_num_groups: int | None = None
    moe_router_group_topk: int | None = None
    moe_ffn_hidden_size: int | None = None
    moe_shared_expert_intermediate_size: int = 0
    moe_shared_expert_gate: bool = False
    moe_grouped_gemm: bool = False
    moe_token_dispatcher_type: Literal["allgather", "alltoall"] = "allgather"
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    activation: Literal["swiglu", "gelu", "squared_relu"] = "swiglu"
    position_embedding_type: Literal["rope", "learned_absolute", "none"] = "rope"
    rotary_base: int = 10000
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    norm_epsilon: float = 1.0e-5
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    kv_channels: int | None = None
    share_embeddings_and_output_weights: bool = False
    init_method_std: float = 0.02
    params_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    seed: int = 1234
    transformer_impl: Literal["local", "transformer_engine"] = "local"
    core_attention: Literal["local", "sdpa"] = "local"
    hybrid_layer_pattern: str = ""
    mamba_state_dim: int = 128
    mamba_head_dim: int = 64
    mamba_num_groups: int = 8
    mamba_num_heads: int | None = None
    heterogeneous_layers_config: str | None = None

    @property
    def is_moe(self) -> bool:
        """True when the model has mixture-of-experts layers."""
        return self.num_moe_experts > 0

    @property
    def is_hybrid(self) -> bool:
        """True when ``hybrid_layer_pattern`` asks for a hybrid (Mamba) model."""
        return bool(self.hybrid_layer_pattern)

    @property
    def hybrid_layer_symbols(self) -> str:
        """The layer symbols of ``hybrid_layer_pattern``, pipeline separators removed."""
        return self.hybrid_layer_pattern.replace(HYBRID_PIPE, "")

    @property
    def mamba_heads(self) -> int:
        """Number of Mamba2 heads (``mamba_num_heads``, or megatron's default for None)."""
        if self.mamba_num_heads is not None:
            return self.mamba_num_heads
        return 2 * self.hidden_size // self.mamba_head_dim

    @property
    def mamba_inner_size(self) -> int:
        """Inner width of a Mamba2 mixer: heads x head dim (the K dimension of ``out_proj``)."""
        return self.mamba_heads * self.mamba_head_dim

    @property
    def expert_ffn_hidden_size(self) -> int:
        """Width of one routed expert's MLP."""
        return self.ffn_hidden_size if self.moe_ffn_hidden_size is None else self.moe_ffn_hidden_size


@dataclass
class ParallelConfig:
    """Process layout. World size = TP x PP x CP x data-parallel size; experts are split EP ways.

    ``sequence_parallel`` applies when ``tensor_model_parallel_size > 1`` (Megatron requires it
    for MoE layers under tensor parallelism). ``virtual_pipeline_model_parallel_size`` > 1 gives
    each pipeline rank that many model chunks (interleaved 1F1B); 1 is plain 1F1B.
    ``distributed_timeout_minutes``: how long a collective waits for the other ranks before it
    fails (the timeout of every process group, default and model-parallel; Megatron's
    ``--distributed-timeout-minutes``). A rank that dies or hangs ends the others' run after at
    most this long instead of leaving them waiting; keep it above the longest step plus a save.
    """

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = True
    distributed_timeout_minutes: int = 10


@dataclass
class QuantizationConfig:
    """How the student is quantized (see ``megatron_qad.quantize.policy``).

    ``policy``: the built-in to start from ("transformer", "hybrid", or null for rules only);
    ``format``: the built-in's NVFP4 format ("nvfp4" or "nvfp4_4over6"; null: nvfp4); ``rules``: a list of
    ``{kinds: [...], modules: [globs], weight: FORMAT, input: FORMAT, feeds_attention: bool}``
    applied after the built-in's, later ones winning; ``kv_cache``: "fp8" or "bf16";
    ``input_amax``: "static" (calibrated, saved in checkpoints) or "dynamic" (every call);
    ``backend``: "emulated" (fake quant + BF16 GEMMs, any device), "te" (Transformer Engine's native
    NVFP4 GEMMs in a TE-spec student on compute capability >= 10.0; not yet run on such a GPU) or
    "auto" (te where it can run, else emulated; see ``megatron_qad.quantize.backend``);
    ``reuse_quantized_weights``: fake-quantize each weight once per optimizer step and reuse it in
    every micro-batch and validation pass (same numerics; holds one quantized copy of the weights
    during the step).
    """

    policy: Literal["transformer", "hybrid"] | None = "transformer"
    format: Literal["nvfp4", "nvfp4_4over6"] | None = None
    rules: list = field(default_factory=list)
    kv_cache: Literal["fp8", "bf16"] = "fp8"
    input_amax: Literal["static", "dynamic"] = "static"
    backend: Literal["auto", "emulated", "te"] = "auto"
    reuse_quantized_weights: bool = True

    def to_policy(self):
        """The ``megatron_qad.quantize.Policy`` these settings describe (PolicyError if invalid)."""
        from .quantize.policy import policy_from_dict

        return policy_from_dict({key: value for key, value in dataclasses.asdict(self).items()
                                 if value is not None and key not in ("backend", "reuse_quantized_weights")})


@dataclass
class TrainingConfig:
    """The optimisation of the student (megatron.core's Adam, LR schedule and batch arithmetic).

    ``global_batch_size`` sequences per optimizer step, ``micro_batch_size`` per data-parallel rank
    and forward pass (the number of micro-batches is ``global_batch_size / (micro_batch_size x
    data-parallel size)``). The LR warms up linearly over ``lr_warmup_iters`` from 0 to ``lr``,
    then decays (``lr_decay_style``) to ``min_lr`` by ``lr_decay_iters`` (null: ``train_iters``).
    ``use_distributed_optimizer``: shard optimizer state over data parallelism (null: when the
    data-parallel size is > 1 on GPUs). ``log_interval`` / ``eval_interval`` in iterations
    (``eval_interval`` null: only after PTQ and at the end); ``eval_iters`` validation global batches.
    ``exit_interval``: stop after an iteration that is a multiple of it, saving a checkpoint first
    (to split a run over jobs with a time limit; the next job resumes). ``exit_duration_minutes``:
    stop the same way once the run has lasted that long (wall clock; Megatron's
    ``--exit-duration-in-mins``). ``exit_signals``: signals (names) that make every rank finish the
    current step, save and exit 0 (one rank receiving one is enough; Megatron's signal handler):
    SIGTERM from preemption, SIGINT (Ctrl-C), SIGUSR1 as SLURM's warning (``--signal=USR1@300`` in
    ``scripts/slurm/qad.sbatch``, which then requeues the job; docs/LAUNCH.md).
    ``deterministic``: Megatron's ``--deterministic-mode`` (``torch.use_deterministic_algorithms``,
    a fixed cuBLAS workspace, NCCL's ring all-reduce, Mamba's fixed Triton configs), so that a
    repeated run on the same GPUs gives the same losses bit for bit (docs/LAYOUTS.md: repeats
    measured with and without it).

    Divergence: a step whose loss (any micro-batch on any rank) is NaN or Inf, or whose gradients
    hold a NaN or Inf or have an L2 norm that overflows FP32, is never applied: the weights, the
    Adam moments and step count and the LR schedule stay as they were (Megatron's skipped
    iteration), so no checkpoint ever holds its result. ``on_nonfinite`` says what the run does
    then: "stop" ends it before that update, on every rank, with one line naming the iteration,
    the value and the last good checkpoint, and exit code 17 (a teacher trained here stops its
    run the same way); "skip" drops the step and goes on with the next global batch (its samples
    count as consumed), until more than ``max_skipped_steps`` steps in a row were non-finite: that
    step stops the run as "stop" does. A finite step sets the count back to 0; it is per job, so a
    resumed run starts at 0. ``max_loss_spike`` (null: off): a step whose loss exceeds that factor
    times the median loss of the last 20 applied steps of the job is handled as a non-finite one,
    and a stop then names as the last good checkpoint the newest one whose weights gave a step that
    passed these checks (a diverging run's newest finite checkpoint can hold blown-up weights;
    :mod:`megatron_qad.train.divergence`).
    """

    train_iters: int = 100
    global_batch_size: int = 8
    micro_batch_size: int = 2
    lr: float = 1.0e-5
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None
    lr_decay_style: Literal["constant", "linear", "cosine"] = "cosine"
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1.0e-8
    use_distributed_optimizer: bool | None = None
    log_interval: int = 10
    eval_interval: int | None = None
    eval_iters: int = 4
    exit_interval: int | None = None
    exit_duration_minutes: int | None = None
    exit_signals: list = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])
    deterministic: bool = False
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = 10
    max_loss_spike: float | None = None


@dataclass
class DistillConfig:
    """The loss: ``kl`` (QAD: KL(teacher || student)), ``ce`` (QAT baseline: cross entropy on the
    data's next tokens) or ``kl+ce`` (``alpha x KL + (1 - alpha) x CE``); ``temperature`` of the
    KL (1 for QAD). ``calibration_iters``: global batches of training data whose max |x| sets the
    static input and K/V scales before training (post-training quantization, PTQ)."""

    loss: Literal["kl", "ce", "kl+ce"] = "kl"
    alpha: float = 0.5
    temperature: float = 1.0
    calibration_iters: int = 2


@dataclass
class TeacherConfig:
    """The frozen BF16 teacher: a megatron.core dist checkpoint (``checkpoint``), which the student
    starts from too. If the directory does not exist and ``pretrain_iters`` > 0, a teacher is first
    trained from scratch for that many iterations (cross entropy on the ``data`` sources, LR
    ``pretrain_lr`` cosine to 0; for small demo models) and saved there; a run stopped on the way
    leaves it marked unfinished, and the next run resumes its training before distilling from it
    (``megatron_qad.train.teacher_state``).

    A second, post-training stage (``posttrain_iters`` > 0; see ``megatron_qad.train.teacher_stages``)
    makes a teacher whose last stage taught it a task, as SFT / RL do: the pre-trained model (kept
    in ``CHECKPOINT.stages/pretrain``) is trained further with cross entropy on
    ``posttrain_sources`` (a ``data.sources``-style list, e.g. an ``arithmetic`` task mixed with
    general text) for ``posttrain_iters`` iterations at LR ``posttrain_lr`` (cosine to 0), and the
    result is the teacher at ``checkpoint``. A third stage (``rft_iters`` > 0) moves the teacher
    beyond its post-training data, as RL does: ``rft_iters`` iterations of cross entropy at LR
    ``rft_lr`` (cosine to 0) on ``rft_sources``, whose ``teacher_answers`` sources (``keep:
    correct``) sample from the post-trained model: rejection-sampling fine-tuning. The CLI does
    this before its run; from Python, call ``teacher_stages.prepare_teacher(config)`` before
    ``run(config)``."""

    checkpoint: str | None = None
    pretrain_iters: int = 0
    pretrain_lr: float = 1.0e-3
    posttrain_iters: int = 0
    posttrain_lr: float = 3.0e-4
    posttrain_sources: list | None = None
    rft_iters: int = 0
    rft_lr: float = 1.0e-4
    rft_sources: list | None = None


@dataclass
class CheckpointConfig:
    """Student checkpoints in Megatron-LM's layout under ``save`` (``iter_NNNNNNN``,
    ``latest_checkpointed_iteration.txt``, torch_dist): every ``save_interval`` iterations (null:
    only at the end) and at the end; ``resume`` continues from the newest one there (same data
    order, optimizer state and LR schedule). ``retain_interval`` (a multiple of ``save_interval``)
    prunes: once a newer checkpoint is complete, the previous one is deleted unless its iteration
    is a multiple of it (Megatron's ``--save-retain-interval``; the newest is never deleted);
    null keeps every checkpoint.

    ``lr_schedule_on_resume``: what a resume does when the LR schedule's settings differ from the
    checkpoint's (``training.lr``, ``min_lr``, ``lr_warmup_iters``, ``lr_decay_iters``,
    ``lr_decay_style``, ``weight_decay``, and ``train_iters`` and ``global_batch_size``, which
    set the decay length when ``lr_decay_iters`` is null): "refuse" stops before anything loads,
    naming the keys (old -> new); "new" applies the recipe's values from the checkpoint's
    iteration on (Megatron's ``--override-opt_param-scheduler``); "checkpoint" keeps the
    checkpoint's schedule and ignores them (``--use-checkpoint-opt_param-scheduler``; a larger
    ``train_iters`` still lengthens the run, at ``min_lr`` past the old decay). Either way one
    line says which values differ. A changed ``train_iters`` that the schedule does not depend on
    (``lr_decay_iters`` set, or a constant LR, and a constant weight decay) is applied in every
    mode. A ``train_iters`` not above the checkpoint's iteration (a finished run launched again
    among them) is refused: nothing is left to train."""

    save: str | None = None
    save_interval: int | None = None
    resume: bool = True
    retain_interval: int | None = None
    lr_schedule_on_resume: Literal["refuse", "new", "checkpoint"] = "refuse"


@dataclass
class DataConfig:
    """Where tokens come from: ``sources`` is a list of mappings ``{type: ..., weight: ...}`` (see
    ``megatron_qad.data``: random, corpus, text, jsonl, indexed, teacher_generated);
    ``seed`` fixes sampling; ``cache_dir`` holds generated data (null: next to the checkpoints).
    ``validation_sources``: held-out data for the KL / CE reports (null: the validation split of
    ``sources``), e.g. real text while training on random tokens.

    Before training one line says how many times the run reads each split's samples; a QAD run
    refuses a train split read more than ``max_repeats`` times over (null: no bound) and, unless
    ``allow_validation_copy``, a validation split that is a copy of training data (its tokens all
    occur, in order, in the train split; :mod:`megatron_qad.data.repeats`)."""

    sources: list = field(default_factory=lambda: [{"type": "random"}])
    validation_sources: list | None = None
    seed: int = 1234
    cache_dir: str | None = None
    max_repeats: int | None = 100
    allow_validation_copy: bool = False


@dataclass
class LoggingConfig:
    """Optional metric sinks besides the iteration lines: TensorBoard event files under
    ``tensorboard_dir``, Weights & Biases run in ``wandb_project`` (each needs its package).
    ``console``: ``full`` prints everything Megatron prints; ``quiet`` sends Megatron's argument
    table, setup and memory reports and INFO lines to ``checkpoint.save/megatron.log`` only, and
    prints the resolved recipe there (``config.yaml``) instead of on the console, which keeps the
    QAD lines, Megatron's iteration and validation lines and errors (``--qad-console``; without
    ``checkpoint.save`` the console stays full)."""

    tensorboard_dir: str | None = None
    wandb_project: str | None = None
    console: Literal["full", "quiet"] = "full"


@dataclass
class ExportConfig:
    """``megatron-qad export``: the deployable checkpoint of the run's newest student goes to
    ``dir`` (null: ``checkpoint.save/hf_nvfp4``) in the convention ``format``: ``modelopt``
    (ModelOpt / TensorRT-LLM: ``quant_method: modelopt``, ``hf_quant_config.json``) or
    ``compressed_tensors`` (compressed-tensors' ``nvfp4-pack-quantized``: ``quant_method:
    compressed-tensors``, which vLLM and transformers read); layers kept in BF16 are written in
    ``dtype``; safetensors files hold at most ``max_shard_gib`` GiB each (more: numbered files
    and the Hugging Face index ``model.safetensors.index.json``)."""

    dir: str | None = None
    format: Literal["modelopt", "compressed_tensors"] = "modelopt"
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    max_shard_gib: float = 5.0


@dataclass
class QADConfig:
    """A whole run: one field per recipe section."""

    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> QADConfig:
    """Read a YAML recipe, apply ``section.key=value`` overrides, and validate the result.

    Override values are parsed with the type of the field they set (``model.hidden_size=128`` is an
    int, ``model.moe_grouped_gemm=true`` a bool, ``model.moe_ffn_hidden_size=null`` None). Null
    (``null``, ``none``, ``~``; in YAML too) sets a field whose type allows None; any other field
    refuses it, naming its type and default.
    Raises :class:`ConfigError` for a missing or unparsable file, unknown keys, wrong types,
    missing required keys, and inconsistent sizes.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found; pass the path of a YAML recipe, "
                          f"e.g. configs/tiny_cpu.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse '{path}' as YAML: {err}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"'{path}' must hold a mapping of sections (model:, parallel:, ...), "
                          f"got a {type(data).__name__}")
    for override in overrides:
        _apply_override(data, override)
    return config_from_dict(data, source=str(path))


def config_from_dict(data: dict, source: str, overrides: list[str] | tuple[str, ...] = ()) -> QADConfig:
    """The validated config of a recipe already parsed into nested dicts (``source`` names it in
    errors), with ``section.key=value`` overrides applied as :func:`load_config` does; ConfigError
    as :func:`load_config`."""
    data = copy.deepcopy(data)
    for override in overrides:
        _apply_override(data, override)
    config = _build(QADConfig, data, prefix="", source=source)
    validate(config)
    return config


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain nested dicts (YAML-serialisable)."""
    return dataclasses.asdict(config)


# ---------------------------------------------------------------------------------------------
# Strict construction of nested dataclasses from plain data.


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _unknown_key_error(key_path: str, name: str, valid: list[str], prefix: str) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=1)
    if close:
        return ConfigError(f"unknown key '{key_path}'; did you mean '{_key(prefix, close[0])}'?")
    where = f"'{prefix}'" if prefix else "the top level"
    return ConfigError(f"unknown key '{key_path}'; valid keys in {where}: {', '.join(valid)}")


def _build(cls: type, data: Any, prefix: str, source: str):
    """Instantiate dataclass ``cls`` from mapping ``data``; ``prefix`` is its key path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix}' must be a mapping of keys to values, "
                          f"got {data!r} ({type(data).__name__})")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in fields:
            raise _unknown_key_error(_key(prefix, str(name)), str(name), sorted(fields), prefix)
    kwargs = {}
    for name, f in fields.items():
        key_path = _key(prefix, name)
        if name in data:
            if data[name] is None and not _is_optional(hints[name]) and not dataclasses.is_dataclass(hints[name]):
                raise _null_error(source, key_path, hints[name], f)
            kwargs[name] = _coerce(data[name], hints[name], key_path, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = _build(hints[name], {}, key_path, source)
            else:
                section = f"the '{prefix}' section" if prefix else "the top level"
                raise ConfigError(f"{source}: missing key '{key_path}' ({_describe(hints[name])}); "
                                  f"add it to {section}")
    return cls(**kwargs)


def _describe(tp: Any) -> str:
    """A short human name of a field type, for error messages."""
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is list:
        return "a list, e.g. [{type: random}]"
    if tp is str:
        return "a string"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if _is_optional(tp):
        return _describe(_strip_optional(tp)) + " or null"
    return str(tp)


def _null_error(source: str, key_path: str, tp: Any, f: dataclasses.Field) -> ConfigError:
    """The error for null given to field ``f`` (type ``tp``, not Optional): its type and its default."""
    if f.default is not dataclasses.MISSING:
        fix = f"give {_describe(tp)}, or leave the key out for its default ({f.default!r})"
    elif f.default_factory is not dataclasses.MISSING:
        fix = f"give {_describe(tp)}, or leave the key out for its default ({f.default_factory()!r})"
    else:
        fix = f"give {_describe(tp)}; the key is required"
    return ConfigError(f"{source}: '{key_path}' cannot be null; {fix}")


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _strip_optional(tp: Any) -> Any:
    (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
    return inner


def _coerce(value: Any, tp: Any, key_path: str, source: str) -> Any:
    """Check ``value`` against field type ``tp``; ints are accepted for floats, nothing else converts."""
    if dataclasses.is_dataclass(tp):  # an empty section ("parallel:" alone) reads as None
        return _build(tp, {} if value is None else value, key_path, source)
    if _is_optional(tp):
        return None if value is None else _coerce(value, _strip_optional(tp), key_path, source)
    if typing.get_origin(tp) is Literal:
        ok = isinstance(value, str) and value in typing.get_args(tp)
    elif tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise ConfigError(f"{source}: '{key_path}' must be {_describe(tp)}, "
                          f"got {value!r} ({type(value).__name__})")
    return value


# ---------------------------------------------------------------------------------------------
# Overrides: section.key=value, parsed with the type of the field they set.

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NULL = {"null", "none", "~"}
"""Override texts that mean null: accepted by Optional fields, refused by the others."""


def _apply_override(data: dict, override: str) -> None:
    """Set one ``a.b=value`` override into the raw recipe mapping ``data`` (in place)."""
    key_path, sep, text = override.partition("=")
    key_path = key_path.strip()
    if not sep or not key_path:
        raise ConfigError(f"override '{override}' must look like section.key=value, "
                          f"e.g. model.hidden_size=128")
    cls, target, prefix = QADConfig, data, ""
    names = key_path.split(".")
    for depth, name in enumerate(names):
        fields = {f.name for f in dataclasses.fields(cls)}
        if name not in fields:
            raise _unknown_key_error(_key(prefix, name), name, sorted(fields), prefix)
        tp = typing.get_type_hints(cls)[name]
        prefix = _key(prefix, name)
        if depth == len(names) - 1:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"override '{override}': '{prefix}' is a section; set one of its "
                                  f"keys, e.g. {prefix}.{dataclasses.fields(tp)[0].name}=...")
            if text.strip().lower() in _NULL and not _is_optional(tp) and not _is_literal_value(text.strip(), tp):
                field_ = next(f for f in dataclasses.fields(cls) if f.name == name)
                raise _null_error(f"override '{override}'", prefix, tp, field_)
            target[name] = _parse_text(text.strip(), tp, f"override '{override}'", prefix)
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"override '{override}': '{prefix}' is a value, not a section; "
                              f"use {prefix}=...")
        if target.get(name) is None:
            target[name] = {}
        section = target[name]
        if not isinstance(section, dict):
            raise ConfigError(f"'{prefix}' must be a mapping of keys to values, got {section!r}")
        cls, target = tp, section


def _is_literal_value(text: str, tp: Any) -> bool:
    """Whether ``text`` is one of the values of a Literal field type (``"none"`` is one for
    ``model.position_embedding_type``, not null)."""
    return typing.get_origin(tp) is Literal and text in typing.get_args(tp)


def _parse_text(text: str, tp: Any, source: str, key_path: str) -> Any:
    """Parse override text as field type ``tp``."""
    if _is_optional(tp):
        if text.lower() in _NULL:
            return None
        return _parse_text(text, _strip_optional(tp), source, key_path)
    try:
        if tp is bool:
            if text.lower() in _TRUE | _FALSE:
                return text.lower() in _TRUE
            raise ValueError
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if tp is list:  # e.g. data.sources=[{type: random}]
            value = yaml.safe_load(text)
            if not isinstance(value, list):
                raise ValueError
            return value
    except (ValueError, yaml.YAMLError):
        raise ConfigError(f"{source}: '{key_path}' must be {_describe(tp)}, got '{text}'") from None
    if typing.get_origin(tp) is Literal and text not in typing.get_args(tp):
        raise ConfigError(f"{source}: '{key_path}' must be {_describe(tp)}, got '{text}'")
    return text


# ---------------------------------------------------------------------------------------------
# Consistency checks between sizes.


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_at_least(section: str, obj: Any, names: tuple[str, ...], minimum: int = 1) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(value >= minimum, f"'{section}.{name}' must be >= {minimum}, got {value}")


def validate(config: QADConfig) -> None:
    """Raise :class:`ConfigError` if the sizes of ``config`` cannot build a model or quantize it."""
    m, p = config.model, config.parallel
    _check_at_least("model", m, ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                 "num_query_groups", "vocab_size", "seq_length", "moe_router_topk"))
    _check_at_least("model", m, ("num_moe_experts", "moe_shared_expert_intermediate_size"), minimum=0)
    _check_at_least("parallel", p, ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                                    "virtual_pipeline_model_parallel_size", "expert_model_parallel_size",
                                    "context_parallel_size", "distributed_timeout_minutes"))
    _require(m.init_method_std > 0, f"'model.init_method_std' must be > 0, got {m.init_method_std}")
    _require(m.norm_epsilon > 0, f"'model.norm_epsilon' must be > 0, got {m.norm_epsilon}")
    _require(not m.rope_scaling or (m.position_embedding_type == "rope" and not m.is_hybrid),
             "'model.rope_scaling' is true but the model is hybrid or has no RoPE ('model.position_embedding_type'); "
             "megatron.core scales RoPE of GPT models only: set model.rope_scaling=false")
    _require(m.rope_scaling_factor > 0, f"'model.rope_scaling_factor' must be > 0, got {m.rope_scaling_factor}")
    _require(m.kv_channels is not None or m.hidden_size % m.num_attention_heads == 0,
             f"'model.hidden_size' ({m.hidden_size}) must be a multiple of 'model.num_attention_heads' "
             f"({m.num_attention_heads}); change one of them, or set 'model.kv_channels' (the head size)")
    _require(m.num_attention_heads % m.num_query_groups == 0,
             f"'model.num_attention_heads' ({m.num_attention_heads}) must be a multiple of "
             f"'model.num_query_groups' ({m.num_query_groups}); change one of them")
    _validate_hybrid(m, p)
    _validate_core_attention(m)
    _validate_heterogeneous(m, p)
    _validate_moe(m, p)
    _validate_parallel(m, p)
    _validate_nvfp4_k_dims(m, p)
    _validate_quantization(config.quantization)
    _validate_training(config.training, config.distill, config.teacher)
    c = config.checkpoint
    if c.retain_interval is not None:
        save_interval = c.save_interval or config.training.train_iters
        _require(c.retain_interval >= 1 and c.retain_interval % save_interval == 0,
                 f"'checkpoint.retain_interval' ({c.retain_interval}) must be a positive multiple of "
                 f"'checkpoint.save_interval' ({save_interval}); change one of them or set it to null")
    _require(config.data.max_repeats is None or config.data.max_repeats >= 1,
             f"'data.max_repeats' must be >= 1 or null (no bound), got {config.data.max_repeats}")
    _require(config.export.max_shard_gib > 0,
             f"'export.max_shard_gib' must be > 0, got {config.export.max_shard_gib}")


def _validate_training(t: TrainingConfig, d: DistillConfig, teacher: TeacherConfig) -> None:
    _check_at_least("training", t, ("train_iters", "global_batch_size", "micro_batch_size", "log_interval",
                                    "eval_iters"))
    _check_at_least("training", t, ("lr_warmup_iters", "max_skipped_steps"), minimum=0)
    _require(t.max_loss_spike is None or t.max_loss_spike > 1,
             f"'training.max_loss_spike' must be > 1 or null (no bound), got {t.max_loss_spike}")
    _check_at_least("distill", d, ("calibration_iters",), minimum=0)
    _check_at_least("teacher", teacher, ("pretrain_iters", "posttrain_iters", "rft_iters"), minimum=0)
    _require(not teacher.rft_iters or (teacher.rft_sources and teacher.posttrain_iters),
             f"'teacher.rft_iters' is {teacher.rft_iters} but 'teacher.rft_sources' is not set or "
             f"'teacher.posttrain_iters' is 0; the rejection-sampling stage continues the post-trained teacher "
             f"on its own data (e.g. [{{type: teacher_answers, task: {{type: arithmetic}}, num_prompts: 1000, "
             f"keep: correct}}]): set both, or set rft_iters to 0")
    _require(not teacher.posttrain_iters or teacher.posttrain_sources,
             f"'teacher.posttrain_iters' is {teacher.posttrain_iters} but 'teacher.posttrain_sources' is not set; "
             f"give the post-training data (e.g. [{{type: arithmetic}}]) or set posttrain_iters to 0")
    _require(not teacher.posttrain_iters or teacher.pretrain_iters,
             f"'teacher.posttrain_iters' is {teacher.posttrain_iters} but 'teacher.pretrain_iters' is 0; the "
             f"post-training stage continues a teacher pre-trained here: set pretrain_iters")
    _require(t.global_batch_size % t.micro_batch_size == 0,
             f"'training.global_batch_size' ({t.global_batch_size}) must be a multiple of "
             f"'training.micro_batch_size' ({t.micro_batch_size})")
    _require(0.0 <= t.min_lr <= t.lr, f"'training.min_lr' ({t.min_lr}) must be between 0 and 'training.lr' ({t.lr})")
    _require(0.0 <= d.alpha <= 1.0, f"'distill.alpha' must be in [0, 1], got {d.alpha}")
    _require(d.temperature > 0, f"'distill.temperature' must be > 0, got {d.temperature}")
    unknown = [name for name in t.exit_signals if name not in _SIGNAL_NAMES]
    _require(not unknown, f"'training.exit_signals' has {unknown}, not signal names; use e.g. "
                          f"[SIGTERM, SIGINT, SIGUSR1]")
    for name in ("lr_decay_iters", "eval_interval", "exit_interval", "exit_duration_minutes"):
        value = getattr(t, name)
        _require(value is None or value >= 1, f"'training.{name}' must be >= 1 or null, got {value}")


def _validate_quantization(q: QuantizationConfig) -> None:
    from .quantize.policy import PolicyError

    _require(isinstance(q.rules, list) and all(isinstance(rule, dict) for rule in q.rules),
             "'quantization.rules' must be a list of mappings such as {kinds: [moe_expert], weight: bf16}")
    try:
        q.to_policy()
    except (PolicyError, TypeError) as err:
        raise ConfigError(f"'quantization': {err}") from None


def _validate_core_attention(m: ModelConfig) -> None:
    if m.core_attention == "local":
        return
    _require(m.transformer_impl == "local" and m.heterogeneous_layers_config is None,
             "'model.core_attention: sdpa' replaces the local spec's attention of GPT and hybrid models; "
             "Transformer Engine and heterogeneous (DeciLM) layers bring their own: set model.core_attention=local")


def _validate_hybrid(m: ModelConfig, p: ParallelConfig) -> None:
    _require(not (m.is_hybrid and m.transformer_impl == "transformer_engine"),
             "'model.transformer_impl: transformer_engine' builds GPT models; hybrid models "
             "('model.hybrid_layer_pattern') are built from the local spec: set it to local")
    if not m.is_hybrid:
        return
    pattern = m.hybrid_layer_pattern
    for symbol in dict.fromkeys(pattern):
        if symbol in HYBRID_LAYER_SYMBOLS or symbol == HYBRID_PIPE:
            continue
        what = _UNSUPPORTED_HYBRID_SYMBOLS.get(symbol)
        known = f" is megatron's symbol for {what}, which megatron_qad does not build" if what else \
            " is not a layer symbol"
        raise ConfigError(f"'model.hybrid_layer_pattern' ({pattern!r}): {symbol!r}{known}; use "
                          f"M (Mamba), * (attention), - (MLP), E (MoE) and | (pipeline stage boundary)")
    layers = m.hybrid_layer_symbols
    _require(len(layers) == m.num_layers,
             f"'model.hybrid_layer_pattern' ({pattern!r}) has {len(layers)} layers but 'model.num_layers' "
             f"is {m.num_layers}; make them equal")
    if HYBRID_PIPE in pattern:
        segments = pattern.split(HYBRID_PIPE)
        stages = p.pipeline_model_parallel_size * p.virtual_pipeline_model_parallel_size
        _require(len(segments) == stages and all(segments),
                 f"'model.hybrid_layer_pattern' ({pattern!r}) has {len(segments)} '|'-separated stages "
                 f"(each needs a layer) but 'parallel.pipeline_model_parallel_size' x "
                 f"'parallel.virtual_pipeline_model_parallel_size' is {stages}; use one segment per "
                 f"(virtual) pipeline stage, or no '|'")
    _require("E" not in layers or m.is_moe,
             f"'model.hybrid_layer_pattern' ({pattern!r}) has MoE layers (E) but 'model.num_moe_experts' "
             f"is 0; set the number of experts")
    _require("E" in layers or not m.is_moe,
             f"'model.num_moe_experts' is {m.num_moe_experts} but 'model.hybrid_layer_pattern' "
             f"({pattern!r}) has no MoE layer (E); add one or set 'model.num_moe_experts' to 0")
    if "M" not in layers:
        return
    _check_at_least("model", m, ("mamba_state_dim", "mamba_head_dim", "mamba_num_groups"))
    if m.mamba_num_heads is None:
        _require((2 * m.hidden_size) % m.mamba_head_dim == 0,
                 f"'model.mamba_head_dim' ({m.mamba_head_dim}) must divide 2 x 'model.hidden_size' "
                 f"({2 * m.hidden_size}) when 'model.mamba_num_heads' is null; set 'model.mamba_num_heads'")
    else:
        _check_at_least("model", m, ("mamba_num_heads",))
    heads, groups, tp = m.mamba_heads, m.mamba_num_groups, p.tensor_model_parallel_size
    _require(heads % groups == 0,
             f"the Mamba head count ({heads}, 'model.mamba_num_heads') must be a multiple of "
             f"'model.mamba_num_groups' ({groups})")
    _require(heads % tp == 0 and groups % tp == 0,
             f"'parallel.tensor_model_parallel_size' ({tp}) must divide the Mamba head count ({heads}, "
             f"'model.mamba_num_heads') and 'model.mamba_num_groups' ({groups})")


def _validate_heterogeneous(m: ModelConfig, p: ParallelConfig) -> None:
    """The DeciLM block file parses, fits the recipe, and every block's sizes split over TP into
    whole NVFP4 blocks."""
    if m.heterogeneous_layers_config is None:
        return
    from .block_configs import KEY, read_blocks

    for setting, allowed in (("transformer_impl", "local"), ("activation", "swiglu")):
        _require(getattr(m, setting) == allowed,
                 f"'{KEY}' builds megatron.core's heterogeneous layers with the local spec and SwiGLU MLPs; "
                 f"set model.{setting}={allowed}")
    _require(not m.is_moe and not m.is_hybrid,
             f"'{KEY}' describes a dense transformer; set model.num_moe_experts=0 and "
             f"model.hybrid_layer_pattern=''")
    blocks = read_blocks(m.heterogeneous_layers_config,
                         {name: getattr(m, name) for name in ("num_layers", "hidden_size", "num_attention_heads",
                                                               "vocab_size")})
    tp = p.tensor_model_parallel_size
    for index, block in enumerate(blocks):
        where = f"'{KEY}' ({m.heterogeneous_layers_config}): block_configs[{index}]"
        if block.num_query_groups is not None:
            _require(block.num_query_groups % tp == 0,
                     f"{where} has {block.num_query_groups} K/V groups, which "
                     f"'parallel.tensor_model_parallel_size' ({tp}) must divide")
        if block.ffn_hidden_size is not None:
            _require(block.ffn_hidden_size % (NVFP4_BLOCK_SIZE * tp) == 0,
                     f"{where} has an MLP of width {block.ffn_hidden_size} (its fc2's K), not a multiple of "
                     f"{NVFP4_BLOCK_SIZE} x 'parallel.tensor_model_parallel_size' ({tp})")


def _validate_moe(m: ModelConfig, p: ParallelConfig) -> None:
    _require(not m.moe_shared_expert_gate or (m.is_moe and m.moe_shared_expert_intermediate_size > 0),
             "'model.moe_shared_expert_gate' is true but the model has no shared expert "
             "('model.num_moe_experts' or 'model.moe_shared_expert_intermediate_size' is 0); "
             "give it a shared expert or set the gate to false")
    if not m.is_moe:
        _require(p.expert_model_parallel_size == 1,
                 f"'parallel.expert_model_parallel_size' is {p.expert_model_parallel_size} but the "
                 f"model is dense ('model.num_moe_experts' = 0); set it to 1 or add experts")
        return
    _require(m.moe_router_topk <= m.num_moe_experts,
             f"'model.moe_router_topk' ({m.moe_router_topk}) must be <= 'model.num_moe_experts' "
             f"({m.num_moe_experts})")
    _require(m.expert_ffn_hidden_size >= 1,
             f"'model.moe_ffn_hidden_size' must be >= 1, got {m.moe_ffn_hidden_size}")
    _require(not m.moe_router_enable_expert_bias or m.moe_router_score_function == "sigmoid",
             "'model.moe_router_enable_expert_bias' needs 'model.moe_router_score_function: sigmoid' "
             f"(got {m.moe_router_score_function!r}); set the score function or disable the bias")
    _require(m.moe_router_topk_scaling_factor is None or m.moe_router_topk_scaling_factor > 0,
             f"'model.moe_router_topk_scaling_factor' must be > 0 or null, got {m.moe_router_topk_scaling_factor}")
    _require(m.moe_router_bias_update_rate >= 0,
             f"'model.moe_router_bias_update_rate' must be >= 0, got {m.moe_router_bias_update_rate}")
    _require(not m.moe_router_pre_softmax or m.moe_router_score_function == "softmax",
             "'model.moe_router_pre_softmax' needs 'model.moe_router_score_function: softmax'; set one of them")
    groups, group_topk = m.moe_router_num_groups, m.moe_router_group_topk
    _require((groups is None) == (group_topk is None),
             "'model.moe_router_num_groups' and 'model.moe_router_group_topk' go together; set both or neither")
    if groups is not None:
        _require(groups >= 1 and m.num_moe_experts % groups == 0 and 1 <= group_topk <= groups
                 and m.moe_router_topk % group_topk == 0,
                 f"group-limited routing needs 'model.moe_router_num_groups' ({groups}) to divide "
                 f"'model.num_moe_experts' ({m.num_moe_experts}) and 'model.moe_router_group_topk' ({group_topk}) "
                 f"to be in 1..num_groups and divide 'model.moe_router_topk' ({m.moe_router_topk})")
    _require(m.num_moe_experts % p.expert_model_parallel_size == 0,
             f"'parallel.expert_model_parallel_size' ({p.expert_model_parallel_size}) must divide "
             f"'model.num_moe_experts' ({m.num_moe_experts})")


def _validate_parallel(m: ModelConfig, p: ParallelConfig) -> None:
    tp = p.tensor_model_parallel_size
    split_sizes = [(name, getattr(m, name))
                   for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size", "vocab_size")]
    if m.is_moe:
        split_sizes += [("moe_ffn_hidden_size", m.expert_ffn_hidden_size),
                        ("moe_shared_expert_intermediate_size", m.moe_shared_expert_intermediate_size)]
    for name, value in split_sizes:
        _require(value % tp == 0,
                 f"'parallel.tensor_model_parallel_size' ({tp}) must divide 'model.{name}' ({value}); "
                 f"change one of them")
    if m.is_moe:
        _require(tp == 1 or p.sequence_parallel,
                 "MoE layers under tensor parallelism need 'parallel.sequence_parallel: true' "
                 "(Megatron refuses to train them otherwise)")
    if tp > 1 and p.sequence_parallel:
        _require(m.seq_length % tp == 0,
                 f"with sequence parallelism 'parallel.tensor_model_parallel_size' ({tp}) must divide "
                 f"'model.seq_length' ({m.seq_length})")
    cp = p.context_parallel_size
    _require(m.seq_length % (2 * cp) == 0 or cp == 1,
             f"'model.seq_length' ({m.seq_length}) must be a multiple of 2 x "
             f"'parallel.context_parallel_size' ({2 * cp}) for load-balanced causal attention")
    pp, vpp = p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size
    _require(vpp == 1 or pp > 1,
             f"'parallel.virtual_pipeline_model_parallel_size' ({vpp}) > 1 interleaves pipeline "
             f"stages and needs 'parallel.pipeline_model_parallel_size' > 1; set it to 1")
    if HYBRID_PIPE not in m.hybrid_layer_pattern:  # explicit stage boundaries may be uneven
        _require(m.num_layers % (pp * vpp) == 0,
                 f"'parallel.pipeline_model_parallel_size' ({pp}) x "
                 f"'parallel.virtual_pipeline_model_parallel_size' ({vpp}) must divide "
                 f"'model.num_layers' ({m.num_layers})")


def _validate_nvfp4_k_dims(m: ModelConfig, p: ParallelConfig) -> None:
    """Every GEMM reduction dimension, whole and per tensor-parallel shard, splits into blocks of 16."""
    tp = p.tensor_model_parallel_size
    k_dims = [("hidden_size", m.hidden_size), ("ffn_hidden_size", m.ffn_hidden_size)]
    if m.is_moe:
        k_dims.append(("moe_ffn_hidden_size", m.expert_ffn_hidden_size))
        if m.moe_shared_expert_intermediate_size:
            k_dims.append(("moe_shared_expert_intermediate_size", m.moe_shared_expert_intermediate_size))
    if m.kv_channels is not None:
        k_dims.append(("num_attention_heads' x 'model.kv_channels", m.num_attention_heads * m.kv_channels))
    if m.is_hybrid and "M" in m.hybrid_layer_symbols:
        name = "mamba_num_heads' x 'model.mamba_head_dim"
        k_dims.append((name, m.mamba_inner_size))
    for name, k in k_dims:
        _require(k % NVFP4_BLOCK_SIZE == 0,
                 f"'model.{name}' ({k}) is a GEMM reduction (K) dimension and must be a multiple of "
                 f"{NVFP4_BLOCK_SIZE} for NVFP4 blocks; use e.g. {_round_up(k, NVFP4_BLOCK_SIZE)}")
        _require((k // tp) % NVFP4_BLOCK_SIZE == 0,
                 f"'model.{name}' ({k}) split over 'parallel.tensor_model_parallel_size' ({tp}) gives "
                 f"K = {k // tp} per rank, not a multiple of {NVFP4_BLOCK_SIZE}; NVFP4 blocks would "
                 f"straddle ranks. Use a multiple of {NVFP4_BLOCK_SIZE * tp}, e.g. "
                 f"{_round_up(k, NVFP4_BLOCK_SIZE * tp)}")


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
