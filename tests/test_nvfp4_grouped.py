"""Multi-tensor NVFP4 fake quant (``numerics.nvfp4_grouped``): every expert's tokens and weight equal
their own single-tensor fake quant bit for bit, whichever backend, with an expert routed no tokens.

CPU: the torch backend against ``nvfp4.fake_quantize`` per tensor; the Triton kernels under Triton's
interpreter (``TRITON_INTERPRET=1``, in a subprocess) against the single-tensor Triton kernel under
the same interpreter. GPU (``gpu``): the Triton kernels against the per-expert torch reference.
Runtime on 2 CPU cores: about 10 s (the interpreter subprocess most of it).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_qad.numerics import nvfp4, nvfp4_grouped

FOS = pytest.mark.parametrize("four_over_six", [False, True], ids=["nvfp4", "4over6"])
AMAX = pytest.mark.parametrize("amax_mode", ["dynamic", "calibrated"])
SPLITS = [5, 0, 40, 19]  # the second expert is routed no tokens
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal bit patterns (so -0 differs from +0, as a sign bit the engine sees would)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    assert torch.equal(actual.view(BITS[actual.dtype]), expected.view(BITS[expected.dtype])), what


def expert_tokens(device, dtype=torch.bfloat16, splits=SPLITS, width=64):
    generator = torch.Generator(device=device).manual_seed(11)
    x = torch.randn(sum(splits), width, generator=generator, device=device).to(dtype)
    x[: splits[0]] *= 8  # experts see inputs of different ranges
    x[-3:] *= 1e-3
    return x


def expert_weights(device, dtype=torch.bfloat16, count=4, shape=(24, 48)):
    generator = torch.Generator(device=device).manual_seed(12)
    return [(torch.randn(shape, generator=generator, device=device) * (0.02 + expert / 10)).to(dtype)
            for expert in range(count)]


def calibrated(count, device):
    """Per-expert static amaxes (one 0, as a calibration that saw no tokens for that expert leaves)."""
    return torch.tensor([7.5, 0.0, 2.25, 0.375][:count], dtype=torch.float32, device=device)


def per_expert_rows(x, splits, amax, four_over_six, backend):
    """The per-expert path: each expert's tokens fake-quantized on their own."""
    pieces = torch.split(x, splits)
    amaxes = [None] * len(pieces) if amax is None else list(amax)
    return torch.cat([nvfp4.fake_quantize(p, a, four_over_six, backend=backend, check_finite=False)
                      for p, a in zip(pieces, amaxes)])


def check_rows_and_weights(device, backend, four_over_six, amax_mode, dtype=torch.bfloat16):
    x = expert_tokens(device, dtype)
    amax = calibrated(len(SPLITS), device) if amax_mode == "calibrated" else None
    got = nvfp4_grouped.fake_quantize_rows(x, SPLITS, amax, four_over_six, backend=backend)
    assert_same_bits(got, per_expert_rows(x, SPLITS, amax, four_over_six, "torch"), "expert tokens")
    if amax is None:
        expected = torch.stack([p.abs().amax().float() if p.numel() else torch.zeros((), device=device)
                                for p in torch.split(x, SPLITS)])
        assert_same_bits(nvfp4_grouped.segments_amax(torch.split(x, SPLITS), backend=backend), expected, "amax")

    weights = expert_weights(device, dtype)
    amax = calibrated(len(weights), device) * 0.01 if amax_mode == "calibrated" else None
    singles = [nvfp4.fake_quantize(w, None if amax is None else amax[i], four_over_six, backend="torch",
                                   check_finite=False) for i, w in enumerate(weights)]
    each = nvfp4_grouped.fake_quantize_tensors(weights, amax, four_over_six, backend=backend)
    stacked = nvfp4_grouped.fake_quantize_tensors(weights, amax, four_over_six, stacked=True, backend=backend)
    assert stacked.shape == (len(weights), *weights[0].shape)
    for expert, single in enumerate(singles):
        assert_same_bits(each[expert], single, f"weight {expert}")
        assert_same_bits(stacked[expert], single, f"stacked weight {expert}")
        # Each result starts where a tensor of its own would: 256-byte aligned within its buffer.
        assert (each[expert].data_ptr() - each[0].data_ptr()) % nvfp4_grouped.ALIGNMENT_BYTES == 0


@FOS
@AMAX
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_torch_backend_equals_the_per_expert_path(four_over_six, amax_mode, dtype):
    check_rows_and_weights("cpu", "torch", four_over_six, amax_mode, dtype)


def test_gradients_are_straight_through_per_expert():
    x = expert_tokens("cpu").requires_grad_()
    grad = torch.randn(x.shape, dtype=x.dtype)
    nvfp4_grouped.fake_quantize_rows(x, SPLITS).backward(grad)
    assert torch.equal(x.grad, grad)
    weights = [w.requires_grad_() for w in expert_weights("cpu")]
    each = nvfp4_grouped.fake_quantize_tensors(weights)
    (each[0].sum() * 2 + each[3].sum()).backward()
    assert torch.all(weights[0].grad == 2) and torch.all(weights[3].grad == 1) and weights[1].grad is None
    for weight in weights:
        weight.grad = None
    stacked = nvfp4_grouped.fake_quantize_tensors(weights, stacked=True)
    (stacked * torch.arange(4.0).view(4, 1, 1)).sum().backward()
    for expert, weight in enumerate(weights):
        assert torch.all(weight.grad == expert)


@pytest.mark.parametrize("call, message", [
    (lambda x: nvfp4_grouped.fake_quantize_rows(x, [5, 0, 40]), "must be >= 0 and sum to the 64 rows"),
    (lambda x: nvfp4_grouped.fake_quantize_rows(x, SPLITS, torch.ones(3)), r"shape \(4,\)"),
    (lambda x: nvfp4_grouped.fake_quantize_rows(x, SPLITS, torch.ones(4, dtype=torch.float64)), "fp32 tensor"),
    (lambda x: nvfp4_grouped.fake_quantize_tensors([x, x.float()]), "the first one's dtype"),
    (lambda x: nvfp4_grouped.fake_quantize_tensors([x, x[:4]], stacked=True), "tensors of one shape"),
    (lambda x: nvfp4_grouped.fake_quantize_tensors([x[:, :8]]), "multiple of 16"),
    (lambda x: nvfp4_grouped.fake_quantize_tensors([]), "no tensors"),
])
def test_bad_input_names_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call(expert_tokens("cpu"))


_INTERPRETED = """
import torch
from megatron_qad.numerics import nvfp4_grouped_triton as grouped, nvfp4_triton as single
bits = {torch.bfloat16: torch.int16, torch.float32: torch.int32}
for dtype in (torch.bfloat16, torch.float32):
    for four_over_six in (False, True):
        x = torch.randn(150, 32, dtype=dtype)
        x[:5] *= 8
        tokens = list(torch.split(x, [5, 0, 100, 45, 0]))  # two experts routed no tokens
        buffer = torch.randn(3 * 16 * 32 + 8, dtype=dtype)
        weights = [torch.randn(16, 32, dtype=dtype), buffer[8:8 + 512].view(16, 32), torch.randn(16, 32, dtype=dtype) * 5]
        token_starts = [0, 5 * 32, 5 * 32, 105 * 32, 150 * 32]
        weight_starts = [0, 640, 1280]  # results 128 elements apart, with gaps between them
        # the first weight (the kernel's base) inside a larger buffer, off its allocation's boundary
        weights_after_a_view = [weights[1], weights[0], weights[2]]
        for segments, out, starts in ((tokens, torch.empty_like(x), token_starts),
                                      (weights, torch.zeros(1280 + 512, dtype=dtype), weight_starts),
                                      (weights_after_a_view, torch.zeros(1280 + 512, dtype=dtype), weight_starts)):
            amax = grouped.segments_amax(segments)
            expected_amax = [s.abs().amax().float() if s.numel() else torch.zeros(()) for s in segments]
            assert torch.equal(amax, torch.stack(expected_amax)), (dtype, amax)
            grouped.fake_quantize_segments(segments, amax, four_over_six, out, starts)
            for i, (s, start) in enumerate(zip(segments, starts)):
                expected = single.fake_quantize(s.contiguous(), amax[i:i + 1].clone(), four_over_six).view(-1)
                got = out.view(-1)[start:start + s.numel()]
                assert torch.equal(got.view(bits[dtype]), expected.view(bits[dtype])), (dtype, four_over_six, i)
        assert not out[512:640].any() and not out[1152:1280].any()  # the gaps are left alone
print("interpreted kernels agree")
"""


def test_triton_kernels_under_the_interpreter_equal_the_single_tensor_kernel():
    """The multi-tensor kernels' addressing (program -> expert search, tokens of one buffer, weights
    in separate buffers, a weight not a whole block away from the first, a first weight off its
    allocation's boundary (found on the GPU: its separately allocated neighbours were read from the
    wrong place), experts with no tokens)
    against the single-tensor kernel, both run by Triton's CPU interpreter. The interpreter's own
    rounding differs from a GPU's, so this checks the layout; the GPU test below checks the bits."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", _INTERPRETED], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "interpreted kernels agree" in result.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@FOS
@AMAX
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_triton_kernels_equal_the_per_expert_path_on_the_gpu(four_over_six, amax_mode, dtype):
    check_rows_and_weights("cuda", "triton", four_over_six, amax_mode, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@FOS
def test_triton_kernels_at_nano_expert_shapes_equal_the_per_expert_triton_path(four_over_six):
    """128 experts of Nano's widths (fc1 1856 x 2688, fc2 2688 x 1856, scaled down in rows), uneven
    routing with empty experts; one expert's weight a view not a whole block into its buffer."""
    generator = torch.Generator(device="cuda").manual_seed(13)
    splits = [int(n) for n in torch.randint(0, 40, (128,), generator=generator, device="cuda")]
    splits[3] = splits[77] = 0
    splits[5] = 300
    x = torch.randn(sum(splits), 2688, generator=generator, device="cuda").bfloat16()
    for expert, piece in enumerate(torch.split(x, splits)):
        piece.mul_(1 + expert / 16)
    got = nvfp4_grouped.fake_quantize_rows(x, splits, None, four_over_six)
    assert_same_bits(got, per_expert_rows(x, splits, None, four_over_six, "triton"), "tokens")
    buffer = torch.randn(128 * 64 * 1856 + 8, generator=generator, device="cuda").bfloat16()
    weights = [buffer[8 + i * 64 * 1856: 8 + (i + 1) * 64 * 1856].view(64, 1856) for i in range(128)]
    weights[9] = weights[9].clone()
    stacked = nvfp4_grouped.fake_quantize_tensors(weights, None, four_over_six, stacked=True)
    for expert, weight in enumerate(weights):
        expected = nvfp4.fake_quantize(weight, None, four_over_six, check_finite=False)
        assert_same_bits(stacked[expert], expected, f"weight {expert}")
