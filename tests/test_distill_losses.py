"""Distillation losses on vocab-sharded logits against plain full-vocabulary float64 references.

TP=1 runs in this process (no process group); TP=2 runs two gloo processes, each holding half of
the vocabulary, and must reproduce the TP=1 values and the matching slices of its gradients.

Tolerances: fp32 inputs are computed in fp32 and compared with float64 references to 1e-5
(values of order 1, vocabularies of a few dozen); bf16 inputs are compared with the float64
reference of the *same bf16-rounded* logits: the arithmetic is fp32, so the values still match to
1e-5, while the gradient is returned in bf16 and matches to one bf16 rounding (rtol 2^-8 plus a
small atol for entries near 0). TP=2 against TP=1 differs only in the fp32 summation order: the
KL is a difference of log-partition functions of the size of the logits (~10 here), so its values
agree to a few fp32 ulps of 10 (1e-5; measured 2e-6), gradients and CE to 1e-6.
"""

import pytest
import torch
import torch.nn.functional as F

from distributed_helpers import run_distributed
from megatron_qad.distill import (DistillationLoss, distillation_loss, vocab_parallel_argmax,
                                  vocab_parallel_cross_entropy, vocab_parallel_kl)

SEQ, BATCH, VOCAB = 6, 3, 24
FP32_TOL = dict(rtol=1e-5, atol=1e-5)
BF16_GRAD_TOL = dict(rtol=2 ** -8, atol=1e-5)
TP_TOL = dict(rtol=1e-6, atol=1e-6)
CHUNK_SIZES = (4096, 1, 7, SEQ * BATCH)  # 7 does not divide the 18 tokens


def make_inputs(dtype=torch.float32, seed=0, vocab=VOCAB):
    """Student and teacher logits [s, b, V] (teacher close to the student), labels and a loss mask."""
    generator = torch.Generator().manual_seed(seed)
    student = 3 * torch.randn(SEQ, BATCH, vocab, generator=generator)
    teacher = student + torch.randn(SEQ, BATCH, vocab, generator=generator)
    labels = torch.randint(0, vocab, (SEQ, BATCH), generator=generator)
    mask = (torch.rand(SEQ, BATCH, generator=generator) > 0.3).float()
    mask[0, 0] = 0.0
    return student.to(dtype), teacher.to(dtype), labels, mask


def reference_kl(student, teacher, temperature):
    """T^2 * sum_v p_t (log p_t - log p_s), float64, full vocabulary."""
    log_p_s = F.log_softmax(student.double() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher.double() / temperature, dim=-1)
    return temperature ** 2 * F.kl_div(log_p_s, log_p_t, log_target=True, reduction="none").sum(-1)


def reference_ce(logits, labels):
    return F.cross_entropy(logits.double().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           reduction="none").view(labels.shape)


def kl_and_grad(student, teacher, mask, temperature, **kwargs):
    student = student.detach().clone().requires_grad_(True)
    kl = vocab_parallel_kl(student, teacher, mask, temperature, **kwargs)
    (kl * torch.linspace(0.5, 1.5, kl.numel()).view(kl.shape)).sum().backward()  # a non-uniform grad_output
    return kl.detach(), student.grad


def reference_kl_and_grad(student, teacher, mask, temperature):
    student = student.detach().double().requires_grad_(True)
    kl = reference_kl(student, teacher, temperature) * mask.double()
    (kl * torch.linspace(0.5, 1.5, kl.numel(), dtype=torch.float64).view(kl.shape)).sum().backward()
    return kl.detach(), student.grad


# --- TP=1 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_value_and_gradient_match_full_vocabulary(dtype, temperature):
    student, teacher, _, mask = make_inputs(dtype)
    kl, grad = kl_and_grad(student, teacher, mask, temperature, chunk_tokens=5)
    ref_kl, ref_grad = reference_kl_and_grad(student, teacher, mask, temperature)
    assert kl.dtype == torch.float32 and kl.shape == (SEQ, BATCH)
    assert grad.dtype == dtype
    torch.testing.assert_close(kl.double(), ref_kl, **FP32_TOL)
    assert torch.all(kl[mask == 0] == 0) and torch.all(grad[mask == 0] == 0)
    torch.testing.assert_close(grad.double(), ref_grad, **(FP32_TOL if dtype == torch.float32 else BF16_GRAD_TOL))
    # The stated closed form: d(T^2 KL)/dz_s = T (softmax(z_s/T) - softmax(z_t/T)).
    closed_form = temperature * (torch.softmax(student.double() / temperature, -1)
                                 - torch.softmax(teacher.double() / temperature, -1))
    weights = torch.linspace(0.5, 1.5, SEQ * BATCH, dtype=torch.float64).view(SEQ, BATCH) * mask.double()
    torch.testing.assert_close(ref_grad, closed_form * weights.unsqueeze(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunking_does_not_change_results(dtype):
    student, teacher, _, mask = make_inputs(dtype)
    unchunked = kl_and_grad(student, teacher, mask, 2.0)
    for chunk in CHUNK_SIZES:
        chunked = kl_and_grad(student, teacher, mask, 2.0, chunk_tokens=chunk)
        torch.testing.assert_close(chunked, unchunked, **TP_TOL)


def test_kl_inputs_are_not_modified():
    student, teacher, _, _ = make_inputs()
    saved = student.clone(), teacher.clone()
    kl_and_grad(student, teacher, None, 2.0)
    assert torch.equal(student, saved[0]) and torch.equal(teacher, saved[1])


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_kl_is_zero_for_identical_logits_and_teacher_gets_no_gradient(temperature):
    student, _, _, _ = make_inputs()
    student.requires_grad_(True)
    teacher = student.detach().clone().requires_grad_(True)
    kl = vocab_parallel_kl(student, teacher, temperature=temperature, chunk_tokens=4)
    kl.sum().backward()
    assert torch.all(kl.abs() <= 1e-7)
    assert torch.all(student.grad.abs() <= 1e-7)
    assert teacher.grad is None


def test_gradcheck_float64():
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(3, 2, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    teacher = torch.randn(3, 2, 5, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 5, (3, 2), generator=generator)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    for temperature in (1.0, 2.5):
        assert torch.autograd.gradcheck(
            lambda z: vocab_parallel_kl(z, teacher, mask, temperature, chunk_tokens=4), (student,))
    assert torch.autograd.gradcheck(lambda z: vocab_parallel_cross_entropy(z, labels, chunk_tokens=4),
                                    (student,))


def test_cross_entropy_matches_torch():
    student, _, labels, _ = make_inputs()
    student.requires_grad_(True)
    ce = vocab_parallel_cross_entropy(student, labels, chunk_tokens=7)
    ce.sum().backward()
    reference = student.detach().double().requires_grad_(True)
    ref_ce = reference_ce(reference, labels)
    ref_ce.sum().backward()
    torch.testing.assert_close(ce.double(), ref_ce, **FP32_TOL)
    torch.testing.assert_close(student.grad.double(), reference.grad, **FP32_TOL)


def test_argmax_matches_torch_including_ties():
    student, teacher, _, _ = make_inputs()
    student[0, 0, 3] = student[0, 0, 17] = student[0, 0].max() + 1  # a tie: the first id wins
    student_top1, teacher_top1 = vocab_parallel_argmax(student, teacher)
    assert student_top1[0, 0] == 3
    assert torch.equal(student_top1, student.argmax(-1)) and torch.equal(teacher_top1, teacher.argmax(-1))


def reference_metrics(student, teacher, labels, mask, temperature=1.0):
    """(sum over non-masked tokens, count) of each metric, float64."""
    keep = mask != 0
    count = float(keep.sum())
    return {"kl": (reference_kl(student, teacher, temperature)[keep].sum().item(), count),
            "student ce": (reference_ce(student, labels)[keep].sum().item(), count),
            "teacher ce": (reference_ce(teacher, labels)[keep].sum().item(), count),
            "top1 agreement": (float((student.argmax(-1) == teacher.argmax(-1))[keep].sum()), count)}


def check_metrics(metrics, expected):
    for key, (total, count) in expected.items():
        assert metrics[key].shape == (2,), key
        assert metrics[key][1].item() == count, key
        assert metrics[key][0].item() == pytest.approx(total, rel=1e-5, abs=1e-5), key


@pytest.mark.parametrize("kind,alpha", [("kl", 1.0), ("ce", 0.0), ("kl+ce", 0.3), ("kl+ce", 1.0)])
def test_distillation_loss_combines_and_reports(kind, alpha):
    student, teacher, labels, mask = make_inputs()
    student.requires_grad_(True)
    loss, num_tokens, metrics = distillation_loss(student, teacher, labels, mask, kind=kind, alpha=alpha,
                                                  temperature=2.0, chunk_tokens=5)
    keep = mask != 0
    kl = reference_kl(student.detach(), teacher, 2.0)[keep].sum().item()
    ce = reference_ce(student.detach(), labels)[keep].sum().item()
    expected = {"kl": kl, "ce": ce, "kl+ce": alpha * kl + (1 - alpha) * ce}[kind]
    assert num_tokens.dtype == torch.int and num_tokens.item() == int(keep.sum())
    assert loss.dim() == 0 and loss.item() == pytest.approx(expected, rel=1e-5)
    check_metrics(metrics, {"loss": (expected, float(keep.sum()))}
                  | reference_metrics(student.detach(), teacher, labels, mask, temperature=2.0))
    loss.backward()
    assert torch.all(student.grad[~keep] == 0) and student.grad.abs().sum() > 0


def test_ce_kind_without_teacher_and_loss_func_contract():
    student, _, labels, _ = make_inputs()
    loss, num_tokens, metrics = DistillationLoss(kind="ce")(student, labels=labels)
    assert num_tokens.item() == SEQ * BATCH and set(metrics) == {"loss", "student ce"}
    assert loss.item() == pytest.approx(reference_ce(student, labels).sum().item(), rel=1e-5)
    # megatron.core's schedules divide the returned loss in place by num_tokens when
    # calculate_per_token_loss is off: the loss must be a tensor that allows it.
    loss /= torch.clamp(num_tokens, min=1)
    assert loss.item() == pytest.approx(reference_ce(student, labels).mean().item(), rel=1e-5)


def test_all_tokens_masked():
    student, teacher, labels, _ = make_inputs()
    student.requires_grad_(True)
    loss, num_tokens, metrics = distillation_loss(student, teacher, labels, torch.zeros(SEQ, BATCH),
                                                  kind="kl+ce", alpha=0.5)
    loss.backward()
    assert loss.item() == 0 and num_tokens.item() == 0 and torch.all(student.grad == 0)
    assert all(value.tolist() == [0.0, 0.0] for value in metrics.values())


def test_errors():
    student, teacher, labels, mask = make_inputs()
    with pytest.raises(ValueError, match=r"student logits have shape \(6, 3, 24\) but teacher logits "
                                         r"have shape \(6, 3, 32\).*pad the vocabulary"):
        vocab_parallel_kl(student, torch.zeros(SEQ, BATCH, 32))
    with pytest.raises(ValueError, match=r"labels has shape \(3, 6\).*\(6, 3\).*transpose"):
        distillation_loss(student, teacher, labels.t(), kind="kl+ce", alpha=0.5)
    with pytest.raises(ValueError, match=r"loss_mask has shape \(3, 6\)"):
        vocab_parallel_kl(student, teacher, mask.t())
    with pytest.raises(ValueError, match=r"labels has shape"):
        vocab_parallel_cross_entropy(student, labels[:2])
    for temperature in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature must be"):
            vocab_parallel_kl(student, teacher, temperature=temperature)
        with pytest.raises(ValueError, match="temperature must be"):
            DistillationLoss(temperature=temperature)
    for alpha in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
            DistillationLoss(kind="kl+ce", alpha=alpha)
    with pytest.raises(ValueError, match="unknown distillation loss kind 'mse'"):
        DistillationLoss(kind="mse")
    with pytest.raises(ValueError, match="needs labels"):
        distillation_loss(student, teacher, kind="kl+ce")
    with pytest.raises(ValueError, match="needs teacher_logits"):
        distillation_loss(student, labels=labels, kind="kl")
    with pytest.raises(ValueError, match="chunk_tokens must be a positive integer"):
        vocab_parallel_kl(student, teacher, chunk_tokens=0)


# --- TP=2 -------------------------------------------------------------------------------------

def _tp2_worker():
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as megatron_ce

    from megatron_qad import parallel
    from megatron_qad.config import ParallelConfig

    parallel.initialize(ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=False),
                        backend="gloo")
    try:
        rank = parallel_state.get_tensor_model_parallel_rank()
        shard = slice(rank * VOCAB // 2, (rank + 1) * VOCAB // 2)
        out = {"kl": {}}
        for dtype in (torch.float32, torch.bfloat16):
            student, teacher, labels, mask = make_inputs(dtype)
            for temperature in (1.0, 2.0):
                for chunk in CHUNK_SIZES:
                    out["kl"][dtype, temperature, chunk] = kl_and_grad(
                        student[..., shard], teacher[..., shard], mask, temperature, chunk_tokens=chunk)
        student, teacher, labels, mask = make_inputs()
        local = student[..., shard].clone().requires_grad_(True)
        ce = vocab_parallel_cross_entropy(local, labels, chunk_tokens=7)
        ce.sum().backward()
        out["ce"] = ce.detach(), local.grad
        mine = local.grad.clone()
        local.grad = None
        reference = megatron_ce(local.clone(), labels)  # a clone: it modifies fp32 logits in place
        reference.sum().backward()
        out["megatron ce"] = reference.detach(), local.grad, mine
        # A tie between the shards: the smaller global id (on rank 0) wins, as torch.argmax does.
        tied = student.clone()
        tied[0, 0, 2] = tied[0, 0, VOCAB - 1] = tied[0, 0].max() + 1
        out["argmax"] = vocab_parallel_argmax(tied[..., shard], teacher[..., shard])
        same = student[..., shard].clone().requires_grad_(True)
        same_kl = vocab_parallel_kl(same, same.detach().clone(), temperature=1.5)
        same_kl.sum().backward()
        out["same"] = same_kl.detach(), same.grad
        local = student[..., shard].clone().requires_grad_(True)
        loss, num_tokens, metrics = distillation_loss(local, teacher[..., shard], labels, mask,
                                                      kind="kl+ce", alpha=0.25, chunk_tokens=5)
        loss.backward()
        out["loss"] = loss.detach(), num_tokens, metrics, local.grad
        return out
    finally:
        parallel.destroy()


@pytest.fixture(scope="module")
def tp2_results():
    return run_distributed(_tp2_worker, 2)


def test_tp2_kl_matches_tp1_for_every_chunking(tp2_results):
    for dtype in (torch.float32, torch.bfloat16):
        student, teacher, _, mask = make_inputs(dtype)
        for temperature in (1.0, 2.0):
            tp1_kl, tp1_grad = kl_and_grad(student, teacher, mask, temperature)
            for chunk in CHUNK_SIZES:
                (kl0, grad0), (kl1, grad1) = (result["kl"][dtype, temperature, chunk]
                                              for result in tp2_results)
                torch.testing.assert_close(kl0, kl1, rtol=0, atol=0)  # identical on both ranks
                torch.testing.assert_close(kl0, tp1_kl, **FP32_TOL)
                grad_tol = TP_TOL if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-6)
                torch.testing.assert_close(torch.cat([grad0, grad1], dim=-1), tp1_grad, **grad_tol)
            # Chunking changes no per-token reduction (measured: bit-identical on the CPU).
            for result in tp2_results:
                reference_kl_, reference_grad = result["kl"][dtype, temperature, 4096]
                for chunk in CHUNK_SIZES:
                    kl, grad = result["kl"][dtype, temperature, chunk]
                    torch.testing.assert_close(kl, reference_kl_, **TP_TOL)
                    torch.testing.assert_close(grad, reference_grad, **TP_TOL)


def test_tp2_cross_entropy_matches_torch_and_megatron(tp2_results):
    student, _, labels, _ = make_inputs()
    reference = student.double().requires_grad_(True)
    ref_ce = reference_ce(reference, labels)
    ref_ce.sum().backward()
    for result in tp2_results:
        torch.testing.assert_close(result["ce"][0].double(), ref_ce, **FP32_TOL)
        megatron_value, megatron_grad, mine = result["megatron ce"]
        torch.testing.assert_close(result["ce"][0], megatron_value, **TP_TOL)
        torch.testing.assert_close(mine, megatron_grad, **TP_TOL)
    grad = torch.cat([result["ce"][1] for result in tp2_results], dim=-1)
    torch.testing.assert_close(grad.double(), reference.grad, **FP32_TOL)


def test_tp2_argmax_and_identical_logits(tp2_results):
    student, teacher, _, _ = make_inputs()
    student[0, 0, 2] = student[0, 0, VOCAB - 1] = student[0, 0].max() + 1
    for result in tp2_results:
        student_top1, teacher_top1 = result["argmax"]
        assert student_top1[0, 0] == 2
        assert torch.equal(student_top1, student.argmax(-1)) and torch.equal(teacher_top1, teacher.argmax(-1))
        same_kl, same_grad = result["same"]
        assert torch.all(same_kl.abs() <= 1e-7) and torch.all(same_grad.abs() <= 1e-7)


def test_tp2_distillation_loss_matches_tp1(tp2_results):
    student, teacher, labels, mask = make_inputs()
    student.requires_grad_(True)
    tp1_loss, tp1_tokens, tp1_metrics = distillation_loss(student, teacher, labels, mask, kind="kl+ce",
                                                          alpha=0.25)
    tp1_loss.backward()
    expected = reference_metrics(student.detach(), teacher, labels, mask)
    for result in tp2_results:
        loss, num_tokens, metrics, _ = result["loss"]
        assert num_tokens.item() == tp1_tokens.item()
        assert loss.item() == pytest.approx(tp1_loss.item(), rel=1e-6)
        check_metrics(metrics, expected)
        for key, value in tp1_metrics.items():
            torch.testing.assert_close(metrics[key], value, **TP_TOL)
    grad = torch.cat([result["loss"][3] for result in tp2_results], dim=-1)
    torch.testing.assert_close(grad, student.grad, **TP_TOL)
