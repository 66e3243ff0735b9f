"""The timed BF16 training step of the benchmarks: megatron.core's DDP, Adam and LR schedule for
this rank's model chunks, from a recipe's ``training`` (QAD runs use Megatron's own loop instead)."""

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_qad.config import TrainingConfig


def wrap_ddp(chunks: list[torch.nn.Module], use_distributed_optimizer: bool) -> list[DistributedDataParallel]:
    """Wrap every chunk in megatron.core's DistributedDataParallel (gradients reduced in fp32 at the
    end of the step by ``finalize_model_grads``, which this installs in the chunks' config)."""
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                               use_distributed_optimizer=use_distributed_optimizer)
    wrapped = []
    for index, chunk in enumerate(chunks):
        chunk.config.finalize_model_grads_func = finalize_model_grads
        # Only the first chunk's buckets start at the beginning of the buffer (megatron.core's rule).
        wrapped.append(DistributedDataParallel(chunk.config, ddp_config, chunk,
                                               disable_bucketing=index > 0))
    return wrapped


def resolve_distributed_optimizer(training: TrainingConfig, data_parallel_size: int, device: torch.device) -> bool:
    """``training.use_distributed_optimizer``, or by default: data-parallel size > 1 on GPUs."""
    if training.use_distributed_optimizer is not None:
        return training.use_distributed_optimizer
    return data_parallel_size > 1 and device.type == "cuda"


def build_optimizer(ddp_chunks: list[DistributedDataParallel], training: TrainingConfig, params_dtype: torch.dtype,
                    use_distributed_optimizer: bool, lr: float | None = None, train_iters: int | None = None):
    """Adam over the chunks' trainable parameters and its LR schedule (returns both).

    ``lr`` / ``train_iters`` override the recipe's (teacher pre-training uses its own). BF16
    parameters get megatron.core's mixed-precision optimizer (fp32 main weights); fp32 ones the
    plain one. The schedule warms up over ``training.lr_warmup_iters`` and decays to
    ``training.min_lr`` (0 when ``lr`` is overridden) by ``lr_decay_iters`` or the last iteration.
    """
    max_lr = training.lr if lr is None else lr
    min_lr = training.min_lr if lr is None else 0.0
    iters = training.train_iters if train_iters is None else train_iters
    decay_iters = training.lr_decay_iters if train_iters is None and training.lr_decay_iters else iters
    bf16 = params_dtype == torch.bfloat16
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=max_lr, min_lr=min_lr, weight_decay=training.weight_decay,
                        adam_beta1=training.adam_beta1, adam_beta2=training.adam_beta2, adam_eps=training.adam_eps,
                        clip_grad=training.clip_grad, bf16=bf16, params_dtype=params_dtype,
                        use_distributed_optimizer=use_distributed_optimizer),
        ddp_chunks)
    warmup = min(training.lr_warmup_iters, decay_iters - 1) if lr is None else 0
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else max_lr, max_lr=max_lr, min_lr=min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=decay_iters, lr_decay_style=training.lr_decay_style if lr is None else "cosine",
        start_wd=training.weight_decay, end_wd=training.weight_decay, wd_incr_steps=iters,
        wd_incr_style="constant")
    return optimizer, scheduler
