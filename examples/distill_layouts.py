"""A few QAD steps at any parallel layout, all starting from one checkpoint: run it at TP=1, then
at TP=2 or PP=2, and compare the KL of every step.

    torchrun --nproc-per-node 1 examples/distill_layouts.py RECIPE CKPT_DIR [key=value ...] [--steps 5]
    torchrun --nproc-per-node 2 examples/distill_layouts.py RECIPE CKPT_DIR parallel.tensor_model_parallel_size=2
    torchrun --nproc-per-node 2 examples/distill_layouts.py RECIPE CKPT_DIR parallel.pipeline_model_parallel_size=2

A run whose CKPT_DIR does not exist saves the teacher it built there first (a megatron.core dist
checkpoint, readable at any layout); every run then loads teacher and student from it. The
student is quantized by the recipe's ``quantization`` section, calibrated inside the pipeline
schedule on one batch, wrapped in megatron.core's DistributedDataParallel and trained with its
Adam optimizer. Data: uniform random tokens from fixed seeds; every layout sees the same global
batch (``MICRO_BATCHES`` micro-batches of ``GLOBAL_ROWS`` rows), each data-parallel rank
``GLOBAL_ROWS / data-parallel size`` rows of every micro-batch. Rank 0 prints one JSON line per step: the KL(teacher || student)
averaged over the global batch's tokens, and the gradient norm. Runs on GPUs (NCCL); CPU
processes (gloo) need fp32 parameters (``model.params_dtype=float32``).
"""

import argparse
import json
import os

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from megatron_qad import parallel, quantize
from megatron_qad.config import load_config
from megatron_qad.distill import DistillationLoss, TeacherStudentStage, chunk_iterators, distillation_step
from megatron_qad.models import build_model_chunks
from megatron_qad.train import checkpointing
from megatron_qad.train.metrics import global_averages

MICRO_BATCHES, GLOBAL_ROWS, LR = 4, 4, 1e-5
CALIBRATION_SEED, DATA_SEED = 17, 1000


def micro_batch_size() -> int:
    """Rows of every micro-batch on this data-parallel rank."""
    dp_size = parallel_state.get_data_parallel_world_size()
    if GLOBAL_ROWS % dp_size:
        raise SystemExit(f"the data-parallel size ({dp_size}) must divide GLOBAL_ROWS ({GLOBAL_ROWS})")
    return GLOBAL_ROWS // dp_size


def global_batch(step_seed: int, vocab_size: int, seq_length: int, device: torch.device) -> list[dict]:
    """This data-parallel rank's rows of the global batch drawn from ``step_seed``."""
    rows, dp_rank = micro_batch_size(), parallel_state.get_data_parallel_rank()
    generator = torch.Generator().manual_seed(step_seed)
    tokens = torch.randint(0, vocab_size, (MICRO_BATCHES, GLOBAL_ROWS, seq_length), generator=generator)
    return [{"tokens": micro[dp_rank * rows:(dp_rank + 1) * rows].to(device)} for micro in tokens]


def main(recipe: str, checkpoint_dir: str, overrides: list[str], steps: int) -> None:
    config = load_config(recipe, overrides)
    model_cfg = config.model
    context = parallel.initialize(config.parallel, seed=model_cfg.seed)
    try:
        teachers = build_model_chunks(model_cfg, config.parallel, context.device)
        if not os.path.exists(checkpoint_dir):  # save_model waits for every rank before writing it
            checkpointing.save_model(teachers, checkpoint_dir)
        checkpointing.load_model(teachers, checkpoint_dir)
        students = build_model_chunks(model_cfg, config.parallel, context.device)
        checkpointing.load_model(students, checkpoint_dir)
        quantize.apply(students, config.quantization.to_policy())
        stages = [TeacherStudentStage(student, teacher) for student, teacher in zip(students, teachers)]
        loss = DistillationLoss("kl")
        seq, vocab = model_cfg.seq_length, model_cfg.vocab_size

        calibration = global_batch(CALIBRATION_SEED, vocab, seq, context.device)
        with quantize.calibration(students):
            distillation_step(stages, chunk_iterators(stages, calibration),
                              MICRO_BATCHES, micro_batch_size(), seq, loss, forward_only=True)

        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
        ddp_chunks = [DistributedDataParallel(stage.config, ddp_config, stage) for stage in stages]
        for stage in stages:
            stage.config.finalize_model_grads_func = finalize_model_grads
        bf16 = model_cfg.params_dtype == "bfloat16"
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=LR, weight_decay=0.0, clip_grad=1.0, bf16=bf16,
                            params_dtype=torch.bfloat16 if bf16 else torch.float32),
            ddp_chunks)
        for step in range(steps):
            batches = global_batch(DATA_SEED + step, vocab, seq, context.device)
            for chunk in ddp_chunks:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            reports = distillation_step(ddp_chunks, chunk_iterators(ddp_chunks, batches), MICRO_BATCHES,
                                        micro_batch_size(), seq, loss)
            _, grad_norm, _ = optimizer.step()
            kl = global_averages(reports, context.device)["kl"]
            if context.rank == 0:
                print(json.dumps({"step": step, "kl": kl, "grad_norm": grad_norm,
                                  "layout": {"tp": config.parallel.tensor_model_parallel_size,
                                             "pp": config.parallel.pipeline_model_parallel_size,
                                             "vpp": config.parallel.virtual_pipeline_model_parallel_size,
                                             "dp": context.data_parallel_size}}), flush=True)
    finally:
        parallel.destroy()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("checkpoint_dir")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, key.path=value")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_intermixed_args()
    main(args.recipe, args.checkpoint_dir, args.overrides, args.steps)
