"""On a GPU: the hooked tiny model computes on CUDA (Triton kernels) what it computes on the CPU.

A CPU process (no visible GPU) builds the tiny GPT-MoE, quantizes it, calibrates it and runs a
forward pass; this process loads the same weights and amaxes into the same model on the GPU. The
fake-quantized weights must agree bit for bit (torch reference on the CPU, Triton on the GPU) and
the logits within fp32 GEMM tolerance.
"""

from pathlib import Path

import pytest
import torch

from distributed_helpers import run_distributed
from megatron_qad.config import load_config

pytestmark = pytest.mark.gpu

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml")
OVERRIDES = ["model.params_dtype=float32", "model.seq_length=64"]


def _batch(vocab: int, seq: int):
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (2, seq), generator=generator)
    return ids, torch.arange(seq)[None].expand(2, -1).contiguous()


def _fake_quantized_weights(model) -> dict[str, torch.Tensor]:
    return {name: module.weight_quantizer(module.weight).detach().cpu()
            for name, module in model.named_modules() if getattr(module, "weight_quantizer", None) is not None}


def _cpu_reference():
    from megatron_qad import models, parallel, quantize

    config = load_config(TINY, OVERRIDES)
    context = parallel.initialize(config.parallel, backend="gloo", seed=config.model.seed)
    try:
        model = models.build_model(config.model, config.parallel, context.device)
        quantize.apply(model, config.quantization.to_policy())
        ids, positions = _batch(config.model.vocab_size, config.model.seq_length)
        mask = models.causal_attention_mask(config.model.seq_length)
        quantize.calibrate(model, [(ids, positions, mask)])
        with torch.no_grad():
            logits = model(ids, positions, mask)
        return {"state": model.state_dict(), "logits": logits, "fq": _fake_quantized_weights(model)}
    finally:
        parallel.destroy()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tiny_model_forward_on_gpu_matches_cpu():
    from megatron_qad import models, parallel, quantize

    (reference,) = run_distributed(_cpu_reference, 1, timeout_s=300)
    config = load_config(TINY, OVERRIDES)
    context = parallel.initialize(config.parallel, backend="nccl", seed=config.model.seed)
    try:
        model = models.build_model(config.model, config.parallel, context.device)
        quantize.apply(model, config.quantization.to_policy())
        amaxes = {key: value for key, value in model.state_dict().items() if key.endswith(".amax")}
        assert amaxes and all(value.device == context.device for value in amaxes.values())  # joins NCCL reductions
        model.load_state_dict(reference["state"], strict=True)
        torch.backends.cuda.matmul.allow_tf32 = False
        fake_quantized = _fake_quantized_weights(model)
        assert fake_quantized.keys() == reference["fq"].keys()
        for name, weight in fake_quantized.items():
            assert torch.equal(weight.view(torch.int32), reference["fq"][name].view(torch.int32)), name
        ids, positions = _batch(config.model.vocab_size, config.model.seq_length)
        mask = models.causal_attention_mask(config.model.seq_length, context.device)
        with torch.no_grad():
            logits = model(ids.to(context.device), positions.to(context.device), mask).cpu()
        error = (logits - reference["logits"]).norm() / reference["logits"].norm()
        print(f"relative L2 difference of the logits, GPU vs CPU: {error:.2e}")
        assert error < 1e-3
    finally:
        parallel.destroy()
