"""Megatron-LM command lines and QAD recipes, in both directions.

QAD runs inside ``megatron.training.pretrain``, whose configuration is Megatron-LM's argument
namespace. Two front doors lead there:

* a Megatron-LM command line plus the QAD flags of :func:`add_qad_arguments`
  (``scripts/pretrain_qad.py``), the way a Megatron-LM user adds QAD to an existing job;
* a YAML recipe (``megatron-qad train RECIPE``), which :func:`recipe_to_argv` compiles into such
  a command line.

Both are parsed by Megatron-LM's own parser (:func:`parse_megatron_args`), so a recipe means
exactly the Megatron flags it compiles to. The plugin pieces read their settings back from the
namespace: :func:`model_config_from_args` / :func:`parallel_config_from_args` give the
``ModelConfig`` / ``ParallelConfig`` the model builders take, and :func:`qad_config_from_args`
the QAD sections (quantization, distillation, teacher, data, export) that Megatron has no flags
for: from ``--qad-recipe`` when given, then the individual ``--qad-*`` flags.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import sys
from pathlib import Path

from ..atomic_files import write_text
from ..checkpoint_tracker import has_tracker
from ..config import (ConfigError, DataConfig, DistillConfig, ExportConfig, ModelConfig, ParallelConfig,
                      QADConfig, QuantizationConfig, TeacherConfig, TrainingConfig, config_from_dict,
                      load_config, to_dict)

# ---------------------------------------------------------------------------------------------
# The QAD flags (Megatron's ``extra_args_provider``).

CONSOLE_MODES = ("full", "quiet")
"""``--qad-console`` / ``logging.console`` (see :mod:`megatron_qad.train.console`)."""

QAD_MODES = ("qad", "teacher")
"""``--qad-mode``: ``qad`` trains a quantized student against the frozen teacher (the loss of
``--qad-loss``); ``teacher`` trains a plain BF16 model with cross entropy (a small teacher from
scratch, as the demo recipes do)."""


def add_qad_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the QAD flags to Megatron-LM's parser (``extra_args_provider`` of ``parse_args``), and
    make its errors one line (:func:`_one_line_error`).

    The flags of the recipe's quantization, distill, teacher and data sections default to None,
    meaning "the ``--qad-recipe`` value, else the recipe default"."""
    parser.error = functools.partial(_one_line_error, parser)
    group = parser.add_argument_group("QAD (megatron_qad)")
    group.add_argument("--qad-recipe", default=None,
                       help="YAML recipe whose quantization, distill, teacher, data and export sections "
                            "apply (its model / parallel / training sections are Megatron's flags here)")
    group.add_argument("--qad-mode", choices=QAD_MODES, default="qad")
    group.add_argument("--qad-teacher-load", default=None,
                       help="the BF16 teacher: a Megatron-LM checkpoint directory (with "
                            "latest_checkpointed_iteration.txt) or a megatron.core dist checkpoint")
    group.add_argument("--qad-loss", choices=("kl", "ce", "kl+ce"), default=None,
                       help="kl: QAD, KL(teacher || student); ce: the QAT baseline; kl+ce: alpha-weighted")
    group.add_argument("--qad-kd-alpha", type=float, default=None, help="weight of the KL in kl+ce")
    group.add_argument("--qad-temperature", type=float, default=None, help="temperature of the KL (1 for QAD)")
    group.add_argument("--qad-calibration-iters", type=int, default=None,
                       help="global batches of training data that set the static input / KV scales (PTQ)")
    group.add_argument("--qad-quant-policy", choices=("transformer", "hybrid", "none"), default=None)
    group.add_argument("--qad-quant-format", choices=("nvfp4", "nvfp4_4over6"), default=None)
    group.add_argument("--qad-kv-cache", choices=("fp8", "bf16"), default=None)
    group.add_argument("--qad-input-amax", choices=("static", "dynamic"), default=None)
    group.add_argument("--qad-backend", choices=("auto", "emulated", "te"), default=None)
    group.add_argument("--qad-core-attention", choices=("local", "sdpa"), default="local",
                       help="the local spec's core attention (--transformer-impl local): local (megatron.core's "
                            "unfused product) or sdpa (PyTorch's fused scaled_dot_product_attention, "
                            "FlashAttention on a GPU; same checkpoints); recipe key model.core_attention")
    group.add_argument("--qad-data-sources", default=None,
                       help="the package's token sources as YAML, e.g. '[{type: random}]' (Megatron's "
                            "--data-path / --mock-data take precedence)")
    group.add_argument("--qad-student-load", default=None,
                       help="start the student from this checkpoint (a trained or PTQ student) instead of "
                            "the teacher's weights; no calibration")
    group.add_argument("--qad-save-student", default=None,
                       help="after the run, save the student (weights and calibrated scales) here as a "
                            "dist checkpoint (what 'megatron-qad ptq' keeps as RUN/ptq)")
    group.add_argument("--qad-eval-report", default=None,
                       help="after the run, write the student's validation metrics and per-layer weight "
                            "quantization errors as JSON here")
    group.add_argument("--qad-extra-exit-signals", default="SIGINT,SIGUSR1",
                       help="with --exit-signal-handler: more signals (comma-separated names) that stop "
                            "the run as --exit-signal does: finish the step, save, exit 0 ('' for none)")
    group.add_argument("--qad-on-nonfinite", choices=("stop", "skip"), default=TrainingConfig.on_nonfinite,
                       help="a step whose loss or gradient is NaN or Inf is never applied; stop: end the run "
                            "there (exit 17); skip: drop it and go on with the next batch")
    group.add_argument("--qad-max-skipped-steps", type=int, default=TrainingConfig.max_skipped_steps,
                       help="with --qad-on-nonfinite skip: the most non-finite steps in a row that are "
                            "skipped; the next one stops the run")
    group.add_argument("--qad-max-loss-spike", type=float, default=TrainingConfig.max_loss_spike,
                       help="a step whose loss exceeds this factor times the median of the last 20 steps' is "
                            "handled as a non-finite one (--qad-on-nonfinite), and a stop names the newest "
                            "checkpoint taken before the divergence; default: no bound")
    group.add_argument("--qad-command", choices=("train", "ptq", "eval"), default="train",
                       help="what the run is, as the summary reports it (megatron-qad's subcommand)")
    group.add_argument("--qad-summary", default=None,
                       help="write the run's full record (PTQ and final validation metrics, every iteration's "
                            "metrics) as JSON here; default: --qad-eval-report when given, else SAVE/summary.json "
                            "(SAVE/ptq_summary.json for --qad-command ptq) with --save")
    group.add_argument("--qad-console", choices=CONSOLE_MODES, default="full",
                       help="quiet: Megatron's argument table, setup and memory reports and INFO lines go to the "
                            "--qad-log file only; the console keeps the QAD lines, the iteration and validation "
                            "lines and errors (needs --qad-log or --save, else the console stays full)")
    group.add_argument("--qad-log", default=None,
                       help="with --qad-console quiet: the log file of Megatron's output (default: SAVE/megatron.log; "
                            "rank N > 0 writes megatron.rankN.log beside it)")
    return parser


def megatron_log(args: argparse.Namespace) -> str | None:
    """The file Megatron's output goes to under ``--qad-console quiet`` (None: a full console)."""
    if args.qad_console != "quiet":
        return None
    if args.qad_log:
        return args.qad_log
    return str(Path(args.save) / "megatron.log") if args.save else None


def _one_line_error(parser: argparse.ArgumentParser, message: str) -> None:
    """A command-line error as one line and exit 2: argparse would print Megatron's usage first,
    some 730 lines that hide the error."""
    parser.exit(2, f"{parser.prog}: error: {message} ({parser.prog} --help lists the flags)\n")


def _qad_overrides(args: argparse.Namespace) -> list[str]:
    """The ``--qad-*`` flags that were given, as recipe ``key=value`` overrides."""
    pairs = (("teacher.checkpoint", args.qad_teacher_load), ("distill.loss", args.qad_loss),
             ("distill.alpha", args.qad_kd_alpha), ("distill.temperature", args.qad_temperature),
             ("distill.calibration_iters", args.qad_calibration_iters),
             ("quantization.format", args.qad_quant_format), ("quantization.kv_cache", args.qad_kv_cache),
             ("quantization.input_amax", args.qad_input_amax), ("quantization.backend", args.qad_backend))
    overrides = [f"{key}={value}" for key, value in pairs if value is not None]
    if args.qad_quant_policy is not None:
        overrides.append("quantization.policy=" + ("null" if args.qad_quant_policy == "none" else args.qad_quant_policy))
    if args.qad_data_sources is not None:
        overrides.append(f"data.sources={args.qad_data_sources}")
    return overrides


# ---------------------------------------------------------------------------------------------
# Recipe -> Megatron flags.

_MODEL_VALUE_FLAGS = (
    ("num_layers", "--num-layers"), ("hidden_size", "--hidden-size"), ("ffn_hidden_size", "--ffn-hidden-size"),
    ("num_attention_heads", "--num-attention-heads"), ("num_query_groups", "--num-query-groups"),
    ("seq_length", "--seq-length"), ("vocab_size", "--vocab-size"), ("normalization", "--normalization"),
    ("position_embedding_type", "--position-embedding-type"), ("rotary_base", "--rotary-base"),
    ("kv_channels", "--kv-channels"), ("init_method_std", "--init-method-std"), ("seed", "--seed"),
    ("transformer_impl", "--transformer-impl"), ("norm_epsilon", "--norm-epsilon"),
)
_MOE_VALUE_FLAGS = (
    ("num_moe_experts", "--num-experts"), ("moe_router_topk", "--moe-router-topk"),
    ("moe_router_score_function", "--moe-router-score-function"),
    ("moe_router_topk_scaling_factor", "--moe-router-topk-scaling-factor"),
    ("moe_router_bias_update_rate", "--moe-router-bias-update-rate"),
    ("moe_ffn_hidden_size", "--moe-ffn-hidden-size"),
    ("moe_token_dispatcher_type", "--moe-token-dispatcher-type"),
    ("moe_router_num_groups", "--moe-router-num-groups"), ("moe_router_group_topk", "--moe-router-group-topk"),
)
_MAMBA_VALUE_FLAGS = (("mamba_state_dim", "--mamba-state-dim"), ("mamba_head_dim", "--mamba-head-dim"),
                      ("mamba_num_groups", "--mamba-num-groups"), ("mamba_num_heads", "--mamba-num-heads"))
_MODEL_SWITCHES = (("moe_router_enable_expert_bias", "--moe-router-enable-expert-bias"),
                   ("moe_shared_expert_gate", "--moe-shared-expert-gate"),
                   ("moe_grouped_gemm", "--moe-grouped-gemm"), ("add_qkv_bias", "--add-qkv-bias"),
                   ("moe_router_pre_softmax", "--moe-router-pre-softmax"), ("rope_scaling", "--use-rope-scaling"))
_TRAINING_VALUE_FLAGS = (
    ("train_iters", "--train-iters"), ("global_batch_size", "--global-batch-size"),
    ("micro_batch_size", "--micro-batch-size"), ("lr", "--lr"), ("min_lr", "--min-lr"),
    ("lr_warmup_iters", "--lr-warmup-iters"), ("lr_decay_iters", "--lr-decay-iters"),
    ("lr_decay_style", "--lr-decay-style"), ("weight_decay", "--weight-decay"), ("clip_grad", "--clip-grad"),
    ("adam_beta1", "--adam-beta1"), ("adam_beta2", "--adam-beta2"), ("adam_eps", "--adam-eps"),
    ("log_interval", "--log-interval"), ("eval_iters", "--eval-iters"), ("exit_interval", "--exit-interval"),
)


LR_SCHEDULE_ON_RESUME_FLAGS = {"refuse": [], "new": ["--override-opt_param-scheduler"],
                               "checkpoint": ["--use-checkpoint-opt_param-scheduler"]}
"""``checkpoint.lr_schedule_on_resume`` -> Megatron's flags (none: its default check, which
:mod:`.resume` makes a one-line refusal)."""


def _value_flags(section, table) -> list[str]:
    argv = []
    for field, flag in table:
        value = getattr(section, field)
        if value is not None:
            argv += [flag, repr(value) if isinstance(value, float) else str(value)]
    return argv


def _model_argv(m: ModelConfig, p: ParallelConfig) -> list[str]:
    argv = _value_flags(m, _MODEL_VALUE_FLAGS)
    argv += ["--max-position-embeddings", str(m.seq_length), "--group-query-attention",
             "--hidden-dropout", "0", "--attention-dropout", "0", "--make-vocab-size-divisible-by", "1"]
    if m.is_moe:
        argv += _value_flags(m, _MOE_VALUE_FLAGS)
        if m.moe_shared_expert_intermediate_size:
            argv += ["--moe-shared-expert-intermediate-size", str(m.moe_shared_expert_intermediate_size)]
    if m.is_hybrid:
        from ..models import hybrid_pattern_with_stages

        # Megatron takes (virtual) pipeline stages of a hybrid model from the pattern's '|' only.
        argv += ["--hybrid-layer-pattern", hybrid_pattern_with_stages(m, p)] + _value_flags(m, _MAMBA_VALUE_FLAGS)
    argv += [flag for field, flag in _MODEL_SWITCHES if getattr(m, field)]
    if m.rope_scaling:
        argv += ["--rope-scaling-factor", repr(m.rope_scaling_factor)]
    if m.heterogeneous_layers_config:
        _check_one_kv_group_count(m.heterogeneous_layers_config)
        # Megatron-LM checks the older RoPE switch too for heterogeneous models.
        argv += ["--heterogeneous-layers-config-path", m.heterogeneous_layers_config,
                 "--use-rotary-position-embeddings"]
    argv += {"swiglu": ["--swiglu"], "squared_relu": ["--squared-relu"], "gelu": []}[m.activation]
    if m.core_attention != "local":
        argv += ["--qad-core-attention", m.core_attention]
    if not m.add_bias_linear:
        argv.append("--disable-bias-linear")
    if not m.share_embeddings_and_output_weights:
        argv.append("--untie-embeddings-and-output-weights")
    if m.params_dtype == "bfloat16":
        argv += ["--bf16", "--accumulate-allreduce-grads-in-fp32"]
    return argv


def _check_one_kv_group_count(path: str) -> None:
    """Megatron-LM's argument checks take one ``n_heads_in_group`` for every attention block (the
    published Llama-Nemotron-Super-49B has 8 everywhere); ConfigError names the key otherwise."""
    blocks = json.loads(Path(path).read_text())["block_configs"]
    groups = {block["attention"]["n_heads_in_group"] for block in blocks} - {None}
    if len(groups) > 1:
        raise ConfigError(f"'model.heterogeneous_layers_config' ({path}): its attention blocks have "
                          f"n_heads_in_group {sorted(groups)}; Megatron-LM's training arguments take one value "
                          f"for all blocks")


def _parallel_argv(p: ParallelConfig, hybrid: bool) -> list[str]:
    argv = ["--tensor-model-parallel-size", str(p.tensor_model_parallel_size),
            "--pipeline-model-parallel-size", str(p.pipeline_model_parallel_size),
            "--expert-model-parallel-size", str(p.expert_model_parallel_size),
            "--context-parallel-size", str(p.context_parallel_size),
            "--distributed-timeout-minutes", str(p.distributed_timeout_minutes)]
    if p.virtual_pipeline_model_parallel_size > 1 and not hybrid:
        argv += ["--num-virtual-stages-per-pipeline-rank", str(p.virtual_pipeline_model_parallel_size)]
    if p.sequence_parallel and p.tensor_model_parallel_size > 1:
        argv.append("--sequence-parallel")
    return argv


def recipe_to_argv(config: QADConfig, recipe_path: str | Path, *, mode: str = "qad",
                   use_gpu: bool, world_size: int) -> list[str]:
    """The Megatron-LM command line (flags only) that runs ``config``.

    ``recipe_path``: the resolved recipe on disk (``--qad-recipe``: the QAD sections). ``mode``:
    "qad" or "teacher" (train the teacher from scratch into ``teacher.checkpoint``: cross entropy,
    ``teacher.pretrain_iters`` at ``teacher.pretrain_lr``, cosine to 0, no warm-up). ``use_gpu``:
    NCCL and the distributed-optimizer default, else gloo; ``world_size``: the number of
    processes, for the default of ``training.use_distributed_optimizer``.
    """
    t, c, p = config.training, config.checkpoint, config.parallel
    argv = (_model_argv(config.model, p) + _parallel_argv(p, config.model.is_hybrid)
            + _value_flags(t, _TRAINING_VALUE_FLAGS))
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    distributed_optimizer = t.use_distributed_optimizer
    if distributed_optimizer is None:
        distributed_optimizer = use_gpu and world_size // model_parallel > 1
    if distributed_optimizer:
        argv.append("--use-distributed-optimizer")
    first_signal, *extra_signals = t.exit_signals or [None]
    if first_signal:
        argv += ["--exit-signal-handler", "--exit-signal", first_signal,
                 "--qad-extra-exit-signals", ",".join(extra_signals)]
    if t.exit_duration_minutes:
        argv += ["--exit-duration-in-mins", str(t.exit_duration_minutes)]
    if t.deterministic:
        argv.append("--deterministic-mode")
    argv += ["--qad-on-nonfinite", t.on_nonfinite, "--qad-max-skipped-steps", str(t.max_skipped_steps)]
    if t.max_loss_spike is not None:
        argv += ["--qad-max-loss-spike", str(t.max_loss_spike)]
    argv += ["--calculate-per-token-loss", "--num-workers", "0", "--ckpt-format", "torch_dist",
             "--distributed-backend", "nccl" if use_gpu else "gloo", "--qad-recipe", str(recipe_path),
             "--qad-mode", mode]
    if not use_gpu:  # the CPU has no CUDA RNG state to save (dropout is off: nothing is lost)
        argv += ["--no-save-rng", "--no-load-rng"]
    decay_iters = t.lr_decay_iters or t.train_iters  # megatron.core needs warm-up < decay
    argv = _replace(argv, {"--lr-warmup-iters": str(min(t.lr_warmup_iters, max(decay_iters - 1, 0)))})
    eval_interval = t.eval_interval or t.train_iters + 1  # null: Megatron validates at the end only
    argv += ["--eval-interval", str(eval_interval)]
    if c.save and config.logging.console == "quiet":  # the teacher's run logs there too
        argv += ["--qad-console", "quiet", "--qad-log", str(Path(c.save) / "megatron.log")]
    if mode == "teacher":
        iters = config.teacher.pretrain_iters
        argv = _replace(argv, {"--train-iters": str(iters), "--lr": repr(config.teacher.pretrain_lr),
                               "--min-lr": "0.0", "--lr-warmup-iters": "0", "--lr-decay-style": "cosine",
                               "--lr-decay-iters": str(iters), "--exit-interval": None})
        argv += ["--save", config.teacher.checkpoint, "--save-interval", str(iters)]
        if has_tracker(config.teacher.checkpoint):  # a teacher whose training stopped resumes
            argv += ["--load", config.teacher.checkpoint]
        return argv
    if c.save:
        argv += ["--save", c.save, "--save-interval", str(c.save_interval or t.train_iters)]
        if c.resume:
            argv += ["--load", c.save] + LR_SCHEDULE_ON_RESUME_FLAGS[c.lr_schedule_on_resume]
        if c.retain_interval:
            argv += ["--save-retain-interval", str(c.retain_interval)]
    if config.logging.tensorboard_dir:
        argv += ["--tensorboard-dir", config.logging.tensorboard_dir]
    if config.logging.wandb_project:
        argv += ["--wandb-project", config.logging.wandb_project]
    return argv


def _replace(argv: list[str], values: dict[str, str | None]) -> list[str]:
    """``argv`` with each flag of ``values`` set to its value (removed for None; appended if absent)."""
    out, index = [], 0
    while index < len(argv):
        flag = argv[index]
        if flag in values:
            index += 2
            continue
        out.append(flag)
        index += 1
    for flag, value in values.items():
        if value is not None:
            out += [flag, value]
    return out


# ---------------------------------------------------------------------------------------------
# Megatron's parser.


def parse_megatron_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` with Megatron-LM's parser plus :func:`add_qad_arguments`, set the Megatron
    arguments the divergence policy relies on (:func:`megatron_qad.train.divergence.configure_megatron`)
    and validate it (``megatron.training.arguments.validate_args``, whose argument table goes to the
    log file under ``--qad-console quiet``); nothing global is set yet. ``--help`` prints Megatron's
    flags and the QAD flags (:func:`megatron_qad.train.megatron_fixes.formattable_help`). Where no
    GPU is visible, the CPU shims of :func:`megatron_qad.cpu_support.apply_training` go in first
    (the checks read the GPU's architecture)."""
    import torch
    from megatron.training.arguments import parse_args, validate_args

    from .. import cpu_support
    from .console import megatron_output
    from .divergence import configure_megatron
    from .megatron_fixes import formattable_help

    if not torch.cuda.is_available():
        cpu_support.apply_training()

    with _argv(argv):
        args = parse_args(extra_args_provider=lambda parser: formattable_help(add_qad_arguments(parser)))
    configure_megatron(args)
    with megatron_output(megatron_log(args)):
        validate_args(args)
    return args


@contextlib.contextmanager
def _argv(argv: list[str]):
    """``sys.argv`` set to ``[program] + argv`` for the block (Megatron's parser reads it)."""
    saved = sys.argv
    sys.argv = [saved[0] if saved else "megatron-qad"] + list(argv)
    try:
        yield
    finally:
        sys.argv = saved


# ---------------------------------------------------------------------------------------------
# Megatron flags -> the package's sections.


def model_config_from_args(args: argparse.Namespace) -> ModelConfig:
    """The ModelConfig a Megatron-LM namespace describes (what :mod:`megatron_qad.models` builds)."""
    if args.swiglu:
        activation = "swiglu"
    elif getattr(args, "squared_relu", False):
        activation = "squared_relu"
    else:
        activation = "gelu"
    vocab_size = getattr(args, "padded_vocab_size", None) or args.vocab_size
    if vocab_size is None:
        raise ConfigError("the model's vocabulary size is unknown: pass --vocab-size (or a tokenizer: "
                          "--tokenizer-type / --tokenizer-model)")
    values = dict(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else args.num_attention_heads,
        vocab_size=vocab_size, seq_length=args.seq_length,
        num_moe_experts=args.num_experts or 0,
        normalization=args.normalization, activation=activation,
        position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
        add_bias_linear=args.add_bias_linear, add_qkv_bias=args.add_qkv_bias, kv_channels=_explicit_kv_channels(args),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        init_method_std=args.init_method_std, params_dtype="bfloat16" if args.bf16 else "float32",
        seed=args.seed, transformer_impl=args.transformer_impl, norm_epsilon=args.layernorm_epsilon,
        rope_scaling=bool(args.use_rope_scaling), rope_scaling_factor=args.rope_scaling_factor,
        hybrid_layer_pattern=getattr(args, "hybrid_layer_pattern", None) or "",
        heterogeneous_layers_config=args.heterogeneous_layers_config_path, core_attention=args.qad_core_attention,
    )
    if values["num_moe_experts"]:
        values.update(
            moe_router_topk=args.moe_router_topk, moe_router_score_function=args.moe_router_score_function,
            moe_router_enable_expert_bias=args.moe_router_enable_expert_bias,
            moe_router_topk_scaling_factor=args.moe_router_topk_scaling_factor,
            moe_router_bias_update_rate=args.moe_router_bias_update_rate,
            moe_ffn_hidden_size=args.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size or 0,
            moe_shared_expert_gate=args.moe_shared_expert_gate, moe_grouped_gemm=args.moe_grouped_gemm,
            moe_token_dispatcher_type=args.moe_token_dispatcher_type,
            moe_router_pre_softmax=args.moe_router_pre_softmax, moe_router_num_groups=args.moe_router_num_groups,
            moe_router_group_topk=args.moe_router_group_topk)
    if values["hybrid_layer_pattern"]:
        values.update(mamba_state_dim=args.mamba_state_dim, mamba_head_dim=args.mamba_head_dim,
                      mamba_num_groups=args.mamba_num_groups, mamba_num_heads=args.mamba_num_heads)
    if args.qad_core_attention != "local" and (args.transformer_impl != "local" or args.heterogeneous_layers_config_path):
        raise ConfigError(f"--qad-core-attention {args.qad_core_attention} replaces the local spec's attention; "
                          f"Transformer Engine and heterogeneous layers bring their own: pass --transformer-impl local "
                          f"without --heterogeneous-layers-config-path, or drop --qad-core-attention")
    return ModelConfig(**values)


def _explicit_kv_channels(args: argparse.Namespace) -> int | None:
    """``--kv-channels``, None where it is Megatron's derived default (hidden / heads)."""
    if args.kv_channels is None or args.kv_channels * args.num_attention_heads == args.hidden_size:
        return None
    return args.kv_channels


def parallel_config_from_args(args: argparse.Namespace) -> ParallelConfig:
    """The ParallelConfig of a Megatron-LM namespace."""
    return ParallelConfig(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size or 1,
        expert_model_parallel_size=args.expert_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        # Megatron turns it off at TP = 1, where it means nothing; the recipe default is on.
        sequence_parallel=bool(args.sequence_parallel) or args.tensor_model_parallel_size == 1,
        distributed_timeout_minutes=args.distributed_timeout_minutes)


@dataclasses.dataclass
class QADSections:
    """The settings Megatron-LM has no flags for, read from ``--qad-recipe`` and ``--qad-*``."""

    quantization: QuantizationConfig
    distill: DistillConfig
    teacher: TeacherConfig
    data: DataConfig
    export: ExportConfig


def qad_sections_from_args(args: argparse.Namespace) -> QADSections:
    """The QAD sections: the ``--qad-recipe``'s (validated as a recipe, with the model of the
    command line), then every ``--qad-*`` flag given. ConfigError names the flag or key."""
    model = to_dict(model_config_from_args(args))
    overrides = _qad_overrides(args)
    if args.qad_recipe:
        config = load_config(args.qad_recipe, overrides)
    else:
        config = config_from_dict({"model": model}, "the command line's model and --qad-* flags", overrides)
    return QADSections(config.quantization, config.distill, config.teacher, config.data, config.export)


def write_summary(path: str | Path, summary: dict) -> None:
    """``summary`` as JSON at ``path`` (rank 0 writes it; atomic)."""
    write_text(path, json.dumps(summary, indent=2, sort_keys=True) + "\n")
