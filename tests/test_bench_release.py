"""benchmarks/bench_qad_step.py frees what a timed variant trained before the next one is built:
the optimizer's FP32 main weights, their gradients and Adam's moments (``release_optimizer``), then
the model (``release``), in place, whoever still holds them. A real megatron.core model, DDP and Adam after one step,
on the CPU (FP32: megatron.core's mixed-precision optimizers need CUDA tensors; there the main
weights are the optimizer's own FP32 copies, here the model's parameters)."""

from pathlib import Path

import torch

from distributed_helpers import single_process
from model_helpers import make_batches
from megatron_qad.config import load_config
from megatron_qad.models import build_gpt_model

ROOT = Path(__file__).resolve().parents[1]


def test_release_empties_the_optimizer_state_then_the_model(bench):
    config = load_config(ROOT / "configs" / "tiny_cpu.yaml",
                         ["model.num_layers=2", "model.seq_length=32", "model.params_dtype=float32"])
    with single_process(config.parallel):
        chunks = bench.wrap_ddp([build_gpt_model(config.model, config.parallel)], False)
        optimizer, _ = bench.build_optimizer(chunks, config.training, torch.float32, False)
        (tokens, positions, mask), = make_batches(config.model, count=1)
        chunks[0](tokens, positions, mask).float().square().mean().backward()
        chunks[0].finish_grad_sync()
        assert optimizer.step()[0]  # the step was applied: Adam holds its moments
        (inner,) = optimizer.chained_optimizers
        adam = inner.optimizer
        params = [param for group in adam.param_groups for param in group["params"]]
        held = [tensor for param in params
                for tensor in (param, adam.state[param]["exp_avg"], adam.state[param]["exp_avg_sq"])]
        assert held and all(tensor.numel() and tensor.dtype == torch.float32 for tensor in held)
        assert any(param.grad is not None for param in params)
        bench.release_optimizer(optimizer)
        assert all(tensor.numel() == 0 for tensor in held) and not adam.state
        assert all(param.grad is None for param in params)

        bench.release(chunks)  # the model: DDP's buffers, its bucket groups' shard views, the parameters
        groups = chunks[0].bucket_groups + chunks[0].expert_parallel_bucket_groups
        assert groups and all(shards is None for group in groups for shards in
                              group.cached_param_buffer_shard_list + group.cached_grad_buffer_shard_list)
        assert all(param.numel() == 0 for param in chunks[0].parameters())
