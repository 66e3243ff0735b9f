"""On a GPU: the hot path of a QAD step never makes the host wait for the device.

A host-device synchronisation empties the queue of launched kernels, so the GPU idles while the
host launches the next ones; one per K/V fake quant (a host-to-device copy of a constant) made
the QAT step 1.3x a BF16 step instead of 1.05x (docs/PERFORMANCE.md). Under
``torch.cuda.set_sync_debug_mode("error")`` every synchronising call raises; these tests run the
quantizers and the loss, forward and backward, under it.
"""

import contextlib

import pytest
import torch

from megatron_qad.distill import DistillationLoss
from megatron_qad.numerics import fp8, nvfp4
from megatron_qad.quantize import grouped
from megatron_qad.quantize.quantizer import TensorQuantizer
from megatron_qad.grouped_experts import grouped_expert_gemm

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@contextlib.contextmanager
def synchronisation_is_an_error():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("fmt", ["nvfp4", "nvfp4_4over6", "fp8"])
@pytest.mark.parametrize("amax_mode", ["static", "dynamic"])
def test_quantizer_forward_and_backward_do_not_synchronise(fmt, amax_mode):
    quantizer = TensorQuantizer(fmt, amax_mode, device="cuda")
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    if amax_mode == "static":
        quantizer.start_calibration()
        quantizer(x)
        quantizer.finish_calibration()
    with synchronisation_is_an_error():
        y = quantizer(x)
        y.backward(torch.ones_like(y))
        quantizer.start_holding()  # a weight reused over micro-batches
        quantizer(x)
        quantizer(x)
        quantizer.stop_holding()


@pytest.mark.parametrize("amax_mode", ["static", "dynamic"])
def test_grouped_expert_quantizers_and_grouped_gemm_do_not_synchronise(amax_mode):
    """All experts of a layer at once: the token counts stay on the host, the segment table and the
    grouped GEMM's offsets go to the GPU as non-blocking copies."""
    splits = [40, 0, 88, 0]
    inputs = torch.nn.ModuleList(TensorQuantizer("nvfp4", amax_mode, device="cuda") for _ in splits)
    weight_quantizers = torch.nn.ModuleList(TensorQuantizer("nvfp4", "dynamic") for _ in splits)
    x = torch.randn(sum(splits), 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weights = [torch.randn(64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in splits]
    if amax_mode == "static":
        for quantizer, tokens in zip(inputs, torch.split(x, splits)):
            quantizer.start_calibration()
            quantizer(tokens)
            quantizer.finish_calibration()
    with synchronisation_is_an_error():
        xq = grouped.fake_quantize_tokens(inputs, x, splits)
        wq = grouped.fake_quantize_weights(weight_quantizers, weights, stacked=True)
        y = grouped_expert_gemm(xq, wq, splits)
        y.backward(torch.ones_like(y))
        for quantizer in weight_quantizers:
            quantizer.start_holding()
        grouped.fake_quantize_weights(weight_quantizers, weights)
        grouped.fake_quantize_weights(weight_quantizers, weights)
        for quantizer in weight_quantizers:
            quantizer.stop_holding()


def test_functional_fake_quant_with_a_device_amax_does_not_synchronise():
    x = torch.randn(128, 256, device="cuda", dtype=torch.bfloat16)
    amax = x.float().abs().amax()
    with synchronisation_is_an_error():
        nvfp4.fake_quantize(x, amax, check_finite=False)
        nvfp4.fake_quantize(x, None, four_over_six=True, check_finite=False)
        fp8.fake_quantize_e4m3(x, amax)


@pytest.mark.parametrize("kind", ["kl", "ce", "kl+ce"])
def test_distillation_loss_does_not_synchronise(kind):
    s, b, vocab = 64, 2, 32000
    student = torch.randn(s, b, vocab, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.randn(s, b, vocab, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (s, b), device="cuda")
    mask = torch.ones(s, b, device="cuda")
    loss_fn = DistillationLoss(kind, alpha=0.5)
    with synchronisation_is_an_error():
        loss, _, _ = loss_fn(student, teacher, labels, mask)
        loss.backward()
