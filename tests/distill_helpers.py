"""What the distillation tests share: the small recipe, fixed micro-batches, the NVFP4 student of
a teacher, and the one-process reference KL and gradients (no schedule)."""

import dataclasses
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_qad import quantize
from megatron_qad.config import load_config
from megatron_qad.models import build_gpt_model, causal_attention_mask

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
SMALL = ["model.params_dtype=float32", "model.num_layers=2", "model.seq_length=32"]
MICRO_BATCHES, MICRO_BATCH_SIZE = 4, 2
# Same weights, same data, same fp32 kernels: the schedule and the pipeline split change no
# arithmetic of the models. The reference KL is computed in fp64 from the fp32 logits; the loss
# computes it in fp32, where each token's KL (~5e-4 here) is a p-weighted sum of differences of
# log-probabilities of size ~7, so fp32 rounding (~5e-7 per token) leaves ~1e-3 relative error per
# token and a few 1e-5 on the sum over the 200-odd tokens. Measured with
# tests/measure_layout_spread.py at seeds 0-3 (model.seed 1234-1237, micro-batch seeds 0-3; seed 0
# is the tests'), every layout against its reference: KL at most 5.1e-5 relative (PP=1 and PP=2,
# seed 1; VPP 5.0e-5, TP=2 4.3e-5, DP=2 4.1e-5, EP=2 7e-7); gradients need at most 9.8e-8
# absolute at rtol 1e-5 (PP=1 and PP=2 alike, seed 3). Tolerances are >= 3x these.
KL_RTOL = 2e-4
GRAD_RTOL, GRAD_ATOL = 1e-5, 4e-7


def small_config(*extra):
    """The tiny recipe, fp32, 2 layers, 32 tokens, with ``extra`` overrides."""
    return load_config(TINY, [*SMALL, *extra])


def micro_batches(model_cfg, count=MICRO_BATCHES, b=MICRO_BATCH_SIZE, seed=0):
    """``count`` dicts: tokens / labels int64 [b, s], loss_mask float [b, s] with ~20 % zeros."""
    generator = torch.Generator().manual_seed(seed)
    s = model_cfg.seq_length
    return [dict(tokens=torch.randint(0, model_cfg.vocab_size, (b, s), generator=generator),
                 labels=torch.randint(0, model_cfg.vocab_size, (b, s), generator=generator),
                 loss_mask=(torch.rand(b, s, generator=generator) > 0.2).float())
            for _ in range(count)]


def dynamic_policy():
    return dataclasses.replace(quantize.transformer(), input_amax="dynamic")


def student_of(teacher_state: dict, cfg, quantized: bool = True, rename=lambda name: name):
    """A student stage: the teacher's weights (keys mapped by ``rename``), NVFP4 when ``quantized``."""
    student = build_gpt_model(cfg.model, cfg.parallel)
    student.load_state_dict({key: teacher_state[rename(key)] for key in student.state_dict()})
    if quantized:
        quantize.apply(student, dynamic_policy())
    return student


def plain_kl_and_grads(student, teacher, micro_batches):
    """Reference without schedule: summed full-vocabulary KL(teacher || student) and student grads."""
    total = 0.0
    for batch in micro_batches:
        tokens = batch["tokens"]
        s = tokens.shape[1]
        positions = torch.arange(s).expand_as(tokens)
        with torch.no_grad():
            teacher_logp = F.log_softmax(teacher(tokens, positions, causal_attention_mask(s)).double(), -1)
        student_logp = F.log_softmax(student(tokens, positions, causal_attention_mask(s)).double(), -1)
        kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
        kl_sum = (kl * batch["loss_mask"]).sum()
        kl_sum.backward()
        total += kl_sum.item()
    grads = {name: param.grad.clone() for name, param in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    return total, grads


def assert_grads_close(got: dict, ref: dict, rtol: float = GRAD_RTOL, atol: float = GRAD_ATOL):
    assert set(got) == set(ref)
    for name, grad in got.items():
        assert grad is not None, f"{name}: no gradient"
        torch.testing.assert_close(grad, ref[name], rtol=rtol, atol=atol,
                                   msg=lambda message: f"{name}: {message}")


def global_namer(stage):
    """Maps this pipeline stage's parameter names to the one-stage model's (global layer numbers)."""
    offset = stage.decoder.layers[0].layer_number - 1
    return lambda name: re.sub(r"decoder\.layers\.(\d+)\.",
                               lambda match: f"decoder.layers.{int(match.group(1)) + offset}.", name)
