"""GPU tests: the fused Triton loss kernels against the torch path on the CPU and a plain formula.

On CUDA, ``vocab_parallel_kl`` and ``vocab_parallel_cross_entropy`` run the kernels of
``megatron_qad.distill.softmax_triton``; the same tensors copied to the CPU run the chunked torch
path. Values and gradients must agree to fp32 rounding (the sums run in another order), and both
must match ``torch.log_softmax`` written out in fp64.
"""

import pytest
import torch

from megatron_qad.distill import DistillationLoss, vocab_parallel_cross_entropy, vocab_parallel_kl
from megatron_qad.distill import vocab_parallel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# (tokens, vocabulary): Qwen2's 151936, GPT-2's odd 50257, one smaller than a kernel block.
SHAPES = [(64, 151936), (37, 50257), (5, 1000)]
SHAPE_IDS = ["qwen2-vocab", "odd-vocab", "small-vocab"]


def logits_pair(tokens: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    """Student and teacher logits (CUDA, [tokens, vocab]) of realistic spread, the student near the teacher."""
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(tokens, vocab, generator=generator) * 4
    student = teacher + torch.randn(tokens, vocab, generator=generator)
    return student.to("cuda", dtype), teacher.to("cuda", dtype)


def fp64_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p_s = torch.log_softmax(student.double() / temperature, dim=-1)
    log_p_t = torch.log_softmax(teacher.double() / temperature, dim=-1)
    return temperature ** 2 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)


def kl_and_grad(student: torch.Tensor, teacher: torch.Tensor, temperature: float, grad_out: torch.Tensor):
    student = student.detach().clone().requires_grad_(True)
    kl = vocab_parallel_kl(student, teacher, temperature=temperature, chunk_tokens=16)
    kl.backward(grad_out.to(kl.device))
    return kl.detach(), student.grad


@pytest.mark.parametrize("tokens,vocab", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_kernels_match_torch_path_and_fp64(tokens, vocab, dtype, temperature):
    student, teacher = logits_pair(tokens, vocab, dtype)
    grad_out = torch.randn(tokens, generator=torch.Generator().manual_seed(1))
    kl_gpu, grad_gpu = kl_and_grad(student, teacher, temperature, grad_out)
    kl_cpu, grad_cpu = kl_and_grad(student.cpu(), teacher.cpu(), temperature, grad_out)
    assert kl_gpu.dtype == torch.float32 and grad_gpu.dtype == dtype
    torch.testing.assert_close(kl_gpu.cpu(), kl_cpu, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(kl_gpu.cpu().double(), fp64_kl(student.cpu(), teacher.cpu(), temperature),
                               rtol=1e-4, atol=1e-5)
    # Gradients are written in the logits' dtype: one rounding of that dtype apart, plus the fp32
    # error of p_s - p_t where the two nearly cancel (~1e-7 on probabilities up to ~0.5).
    atol = 1e-6 if dtype == torch.float32 else 2e-6
    torch.testing.assert_close(grad_gpu.cpu().float(), grad_cpu.float(), rtol=1e-2 if dtype != torch.float32
                               else 1e-4, atol=atol)
    p_s = torch.softmax(student.cpu().double() / temperature, dim=-1)
    p_t = torch.softmax(teacher.cpu().double() / temperature, dim=-1)
    expected = temperature * (p_s - p_t) * grad_out.double()[:, None]
    torch.testing.assert_close(grad_gpu.cpu().double(), expected, rtol=1e-2, atol=atol * 2)


@pytest.mark.parametrize("tokens,vocab", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_cross_entropy_kernels_match_torch_path_and_fp64(tokens, vocab, dtype):
    logits, _ = logits_pair(tokens, vocab, dtype, seed=3)
    labels = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(4))
    labels[0], labels[-1] = 0, vocab - 1  # the first and the last entry of the vocabulary
    grad_out = torch.randn(tokens, generator=torch.Generator().manual_seed(5))

    def ce_and_grad(x):
        x = x.detach().clone().requires_grad_(True)
        ce = vocab_parallel_cross_entropy(x, labels.to(x.device), chunk_tokens=16)
        ce.backward(grad_out.to(x.device))
        return ce.detach(), x.grad

    ce_gpu, grad_gpu = ce_and_grad(logits)
    ce_cpu, grad_cpu = ce_and_grad(logits.cpu())
    torch.testing.assert_close(ce_gpu.cpu(), ce_cpu, rtol=2e-5, atol=1e-5)
    expected = -torch.log_softmax(logits.cpu().double(), dim=-1).gather(-1, labels[:, None])[:, 0]
    torch.testing.assert_close(ce_gpu.cpu().double(), expected, rtol=1e-5, atol=1e-5)
    atol = 1e-6 if dtype == torch.float32 else 2e-6
    torch.testing.assert_close(grad_gpu.cpu().float(), grad_cpu.float(),
                               rtol=1e-2 if dtype != torch.float32 else 1e-4, atol=atol)
    onehot = torch.nn.functional.one_hot(labels, vocab).double()
    expected_grad = (torch.softmax(logits.cpu().double(), dim=-1) - onehot) * grad_out.double()[:, None]
    torch.testing.assert_close(grad_gpu.cpu().double(), expected_grad, rtol=1e-2, atol=atol * 2)


def test_kernel_statistics_combine_over_vocabulary_shards():
    """Per-shard statistics from the kernel, combined as tensor-parallel ranks combine them, give
    the whole vocabulary's KL (the combine itself runs over real ranks in the CPU layout tests)."""
    student, teacher = logits_pair(16, 151936, torch.bfloat16, seed=7)
    shards = [vocab_parallel._local_statistics(s, t, 1.0, 16)
              for s, t in zip(student.chunk(4, dim=-1), teacher.chunk(4, dim=-1))]
    stats = torch.stack(shards)  # [shards, tokens, 5]
    maxima = stats[..., :2].amax(dim=0)
    rescale = torch.exp(stats[..., :2] - maxima)
    sum_s = (stats[..., 2] * rescale[..., 0]).sum(dim=0)
    sum_t = (stats[..., 3] * rescale[..., 1]).sum(dim=0)
    cross = (stats[..., 4] * rescale[..., 1]).sum(dim=0)
    kl = cross / sum_t + maxima[:, 0] + sum_s.log() - maxima[:, 1] - sum_t.log()
    torch.testing.assert_close(kl.cpu().double(), fp64_kl(student.cpu(), teacher.cpu(), 1.0), rtol=1e-4, atol=1e-5)


def test_distillation_loss_on_megatron_layout_with_mask():
    """DistillationLoss on CUDA [s, b, V] logits with a loss mask: the kernels' masked sum and
    gradient equal the CPU path's, and masked tokens get no gradient."""
    s, b, vocab = 32, 2, 151936
    student, teacher = logits_pair(s * b, vocab, torch.bfloat16, seed=9)
    student, teacher = student.view(s, b, vocab), teacher.view(s, b, vocab)
    mask = torch.ones(s, b)
    mask[-5:] = 0
    results = {}
    for device in ("cuda", "cpu"):
        x = student.to(device).detach().clone().requires_grad_(True)
        loss, num_tokens, metrics = DistillationLoss("kl")(x, teacher.to(device), None, mask.to(device))
        loss.backward()
        results[device] = (loss.detach().cpu(), int(num_tokens), {k: v.cpu() for k, v in metrics.items()},
                           x.grad.cpu().float())
    (loss_gpu, n_gpu, metrics_gpu, grad_gpu), (loss_cpu, n_cpu, metrics_cpu, grad_cpu) = results["cuda"], results["cpu"]
    assert n_gpu == n_cpu == (s - 5) * b
    torch.testing.assert_close(loss_gpu, loss_cpu, rtol=2e-5, atol=1e-6)
    for name in metrics_cpu:
        torch.testing.assert_close(metrics_gpu[name], metrics_cpu[name], rtol=2e-5, atol=1e-6)
    assert torch.count_nonzero(grad_gpu[-5:]) == 0
    torch.testing.assert_close(grad_gpu, grad_cpu, rtol=1e-2, atol=2e-6)
