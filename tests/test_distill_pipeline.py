"""Teacher + student through megatron.core's pipeline schedules (gloo, fp32 tiny GPT-MoE).

The student is the teacher's weights quantized with the "transformer" policy and dynamic input /
KV amaxes (``input_amax="dynamic"``, so no calibration pass is needed and every layout sees the
same scales), which makes the KL non-zero. References are computed in one process without any
schedule: teacher forward, student forward, a full-vocabulary KL written here, backward of the
KL summed over the non-masked tokens (what the schedule back-propagates with
``calculate_per_token_loss``).
"""

import contextlib

import pytest
import torch

from distill_helpers import (KL_RTOL, MICRO_BATCH_SIZE, MICRO_BATCHES,
                             assert_grads_close, dynamic_policy, global_namer, micro_batches,
                             plain_kl_and_grads, small_config, student_of)
from distributed_helpers import run_distributed, single_process
from megatron_qad import parallel, quantize
from megatron_qad.numerics import nvfp4_grouped
from megatron_qad.quantize import grouped_mlp
from megatron_qad.distill import (DistillationLoss, LayoutMismatchError, TeacherStudentStage,
                                  distillation_step, sum_reports)
from megatron_qad.models import build_gpt_model


def test_pp1_schedule_matches_plain_kl_and_grads():
    cfg = small_config()
    batches = micro_batches(cfg.model)
    with single_process(cfg.parallel):
        teacher = build_gpt_model(cfg.model, cfg.parallel)
        student = student_of(teacher.state_dict(), cfg)
        ref_kl, ref_grads = plain_kl_and_grads(student, teacher, batches)
        stage = TeacherStudentStage(student, teacher)
        reports = distillation_step(stage, iter(batches), MICRO_BATCHES, MICRO_BATCH_SIZE,
                                    cfg.model.seq_length, DistillationLoss("kl"))
        grads = {name: param.grad for name, param in student.named_parameters()}
    assert len(reports) == MICRO_BATCHES
    totals = sum_reports(reports)
    assert ref_kl > 1e-3
    assert totals["kl"][0].item() == pytest.approx(ref_kl, rel=KL_RTOL)
    assert totals["kl"][1].item() == sum(batch["loss_mask"].sum().item() for batch in batches)
    assert_grads_close(grads, ref_grads)
    assert all(param.grad is None for param in teacher.parameters())


def test_reused_weight_quantization_changes_no_bit(monkeypatch):
    """Weights fake-quantized once per step (quantize.reuse_quantized_weights) give the same KL and
    the same gradients, bit for bit, as quantizing at every micro-batch; the weight quantizers run
    once per step instead of once per micro-batch (a MoE layer's experts as one group per linear
    role: quantize.grouped_mlp), and nothing is held after the block."""
    cfg = small_config()
    batches = micro_batches(cfg.model)
    quantized_tensors = []
    original = quantize.TensorQuantizer._fake_quantize

    def counting(self, x, amax):
        quantized_tensors.append(self.owner)
        return original(self, x, amax)

    monkeypatch.setattr(quantize.TensorQuantizer, "_fake_quantize", counting)
    grouped_weight_launches = []
    grouped_original = nvfp4_grouped.fake_quantize_tensors

    def counting_grouped(*args, **kwargs):
        grouped_weight_launches.append(1)
        return grouped_original(*args, **kwargs)

    monkeypatch.setattr(nvfp4_grouped, "fake_quantize_tensors", counting_grouped)
    with single_process(cfg.parallel):
        teacher = build_gpt_model(cfg.model, cfg.parallel)
        student = student_of(teacher.state_dict(), cfg)
        stage = TeacherStudentStage(student, teacher)
        results = {}
        for reuse in (False, True):
            quantized_tensors.clear()
            grouped_weight_launches.clear()
            with quantize.reuse_quantized_weights(stage) if reuse else contextlib.nullcontext():
                reports = distillation_step(stage, iter(batches), MICRO_BATCHES, MICRO_BATCH_SIZE,
                                            cfg.model.seq_length, DistillationLoss("kl"))
            results[reuse] = (sum_reports(reports)["kl"][0].item(),
                              {name: param.grad.clone() for name, param in student.named_parameters()},
                              [owner for owner in quantized_tensors if owner.endswith(".weight")],
                              len(grouped_weight_launches))
            student.zero_grad(set_to_none=True)
        weight_quantizers = [m.weight_quantizer for m in student.modules() if hasattr(m, "weight_quantizer")]
        grouped_layers = [m for m in student.modules() if grouped_mlp.is_quantized_sequential_mlp(m)]
    in_groups = {id(expert.weight_quantizer) for layer in grouped_layers for expert in layer.modules()
                 if hasattr(expert, "weight_quantizer")}
    single = [q for q in weight_quantizers if id(q) not in in_groups]
    (kl, grads, weight_calls, launches), (kl_reused, grads_reused, weight_calls_reused, launches_reused) = (
        results[False], results[True])
    assert kl_reused == kl
    for name, grad in grads.items():
        assert torch.equal(grads_reused[name], grad), name
    assert grouped_layers and single
    assert len(weight_calls) == MICRO_BATCHES * len(single)
    assert sorted(weight_calls_reused) == sorted(q.owner for q in single)
    assert (launches, launches_reused) == (MICRO_BATCHES * 2 * len(grouped_layers), 2 * len(grouped_layers))
    assert all(q._held is None and not q.holding for q in weight_quantizers)


def test_reused_weight_quantization_follows_a_new_weight():
    """Inside the block a quantizer given another tensor than the one it holds quantizes that one;
    after the block a changed weight is quantized afresh."""
    cfg = small_config()
    with single_process(cfg.parallel):
        student = student_of(build_gpt_model(cfg.model, cfg.parallel).state_dict(), cfg)
        linear = student.decoder.layers[0].self_attention.linear_proj
        quantizer = linear.weight_quantizer
        other = torch.randn_like(linear.weight)
        with quantize.reuse_quantized_weights(student):
            first = quantizer(linear.weight)
            assert torch.equal(quantizer(other), quantizer._fake_quantize(other, quantizer.current_amax(other)))
            assert torch.equal(quantizer(linear.weight), first)
        with torch.no_grad():
            linear.weight.mul_(1.5)
        with quantize.reuse_quantized_weights(student):
            assert not torch.equal(quantizer(linear.weight), first)


def test_unquantized_copy_has_zero_kl_and_zero_grads():
    cfg = small_config()
    batches = micro_batches(cfg.model, count=2)
    with single_process(cfg.parallel):
        teacher = build_gpt_model(cfg.model, cfg.parallel)
        student = student_of(teacher.state_dict(), cfg, quantized=False)
        reports = distillation_step(TeacherStudentStage(student, teacher), iter(batches), 2,
                                    MICRO_BATCH_SIZE, cfg.model.seq_length, DistillationLoss("kl"))
        grads = [param.grad for param in student.parameters()]
    assert abs(sum_reports(reports)["kl"][0].item()) < 1e-7
    assert all(grad is not None and grad.abs().max().item() < 1e-7 for grad in grads)


def test_forward_only_builds_no_autograd_graph():
    """Calibration and validation passes keep no graph alive across micro-batches (it would hold
    every micro-batch's activations until the step ends)."""
    cfg = small_config()
    batches = micro_batches(cfg.model, count=2)
    with single_process(cfg.parallel):
        teacher = build_gpt_model(cfg.model, cfg.parallel)
        student = student_of(teacher.state_dict(), cfg)
        tracked = []
        student.output_layer.register_forward_hook(lambda module, inputs, output: tracked.append(output[0].requires_grad))
        stage = TeacherStudentStage(student, teacher)
        for forward_only in (True, False):
            distillation_step(stage, iter(batches), 2, MICRO_BATCH_SIZE, cfg.model.seq_length,
                              DistillationLoss("kl"), forward_only=forward_only)
    assert tracked == [False, False, True, True]


def test_teacher_frozen_through_an_optimizer_step():
    cfg = small_config()
    batches = micro_batches(cfg.model, count=2)
    with single_process(cfg.parallel):
        teacher = build_gpt_model(cfg.model, cfg.parallel)
        student = student_of(teacher.state_dict(), cfg)
        stage = TeacherStudentStage(student, teacher)
        teacher_before = {name: param.clone() for name, param in teacher.named_parameters()}
        student_before = {name: param.detach().clone() for name, param in student.named_parameters()}
        teacher_ids = {id(param) for param in teacher.parameters()}
        assert not teacher_ids & {id(param) for param in stage.parameters()}
        assert all(key.startswith("student.") for key in stage.state_dict())
        assert all(not param.requires_grad for param in teacher.parameters())
        stage.train()
        assert student.training and not teacher.training
        optimizer = torch.optim.SGD(stage.parameters(), lr=0.1)
        distillation_step(stage, iter(batches), 2, MICRO_BATCH_SIZE, cfg.model.seq_length,
                          DistillationLoss("kl"))
        optimizer.step()
    assert all(param.grad is None for param in teacher.parameters())
    for name, param in teacher.named_parameters():
        assert torch.equal(param, teacher_before[name]), name
    changed = [name for name, param in student.named_parameters()
               if not torch.equal(param.detach(), student_before[name])]
    assert len(changed) == len(student_before)


def test_layout_mismatch_is_refused():
    cfg, deeper = small_config(), small_config("model.num_layers=4", "model.hidden_size=64")
    with single_process(cfg.parallel):
        student = build_gpt_model(cfg.model, cfg.parallel)
        teacher = build_gpt_model(deeper.model, deeper.parallel)
        with pytest.raises(LayoutMismatchError, match=r"layers: student \(0, 1\), teacher \(0, 1, 2, 3\)"):
            TeacherStudentStage(student, teacher)
        with pytest.raises(LayoutMismatchError, match="hidden_size: student 128, teacher 64"):
            TeacherStudentStage(student, teacher)


def test_wrong_micro_batch_shape_is_refused():
    cfg = small_config()
    batches = micro_batches(cfg.model, count=1, b=3)
    with single_process(cfg.parallel):
        teacher = build_gpt_model(cfg.model, cfg.parallel)
        stage = TeacherStudentStage(student_of(teacher.state_dict(), cfg, quantized=False), teacher)
        with pytest.raises(ValueError, match=r"\[micro_batch_size, seq_length\] = \[2, 32\], got \[3, 32\]"):
            distillation_step(stage, iter(batches), 1, MICRO_BATCH_SIZE, cfg.model.seq_length,
                              DistillationLoss("kl"))


def _pp2_rank(teacher_state: dict, batches: list):
    cfg = small_config("parallel.pipeline_model_parallel_size=2")
    parallel.initialize(cfg.parallel, backend="gloo")
    try:
        teacher = build_gpt_model(cfg.model, cfg.parallel)
        rename = global_namer(teacher)

        teacher.load_state_dict({key: teacher_state[rename(key)] for key in teacher.state_dict()})
        student = student_of(teacher_state, cfg, rename=rename)
        stage = TeacherStudentStage(student, teacher)
        reports = distillation_step(stage, iter(batches), MICRO_BATCHES, MICRO_BATCH_SIZE,
                                    cfg.model.seq_length, DistillationLoss("kl"))
        grads = {rename(name): param.grad for name, param in student.named_parameters()}
        teacher_grads = sum(param.grad is not None for param in teacher.parameters())
        return dict(reports=reports, grads=grads, teacher_grads=teacher_grads,
                    post_process=stage.post_process)
    finally:
        parallel.destroy()


@pytest.fixture(scope="module")
def tp1_reference():
    """Teacher state, micro-batches, KL and student grads of the quantized student in one process."""
    cfg = small_config()
    batches = micro_batches(cfg.model)
    with single_process(cfg.parallel):
        teacher = build_gpt_model(cfg.model, cfg.parallel)
        teacher_state = {key: value.clone() if torch.is_tensor(value) else value
                         for key, value in teacher.state_dict().items()}
        student = student_of(teacher_state, cfg)
        ref_kl, ref_grads = plain_kl_and_grads(student, teacher, batches)
    return teacher_state, batches, ref_kl, ref_grads


def test_pp2_1f1b_matches_single_process(tp1_reference):
    teacher_state, batches, ref_kl, ref_grads = tp1_reference
    first, last = run_distributed(_pp2_rank, 2, teacher_state, batches, timeout_s=300)
    assert not first["post_process"] and last["post_process"]
    assert first["reports"] == [] and len(last["reports"]) == MICRO_BATCHES
    assert first["teacher_grads"] == last["teacher_grads"] == 0
    assert not set(first["grads"]) & set(last["grads"])
    assert sum_reports(last["reports"])["kl"][0].item() == pytest.approx(ref_kl, rel=KL_RTOL)
    assert_grads_close({**first["grads"], **last["grads"]}, ref_grads)


# EP=2: an unquantized student (the teacher plus fixed noise), because dynamic NVFP4 amaxes are
# taken over the tokens a rank holds, which EP=2 (= DP=2 here) splits. Expert grads are compared
# directly, dense grads summed over the two ranks (what the data-parallel all-reduce does); the
# summation order of fp32 reductions differs from one process. Measured at seeds 0-3 (see
# KL_RTOL): KL at most 7e-7 relative, gradients need at most 1.4e-7 absolute at rtol 1e-4 (7x
# under EP_ATOL).
EP_RTOL, EP_ATOL = 1e-4, 1e-6


def _ep2_rank(teacher_state: dict, student_state: dict, batches: list):
    from megatron.core import parallel_state
    from model_helpers import expert_layout, global_expert_name, load_with_experts_renumbered

    cfg = small_config("parallel.expert_model_parallel_size=2")
    parallel.initialize(cfg.parallel, backend="gloo")
    try:
        teacher = build_gpt_model(cfg.model, cfg.parallel)
        student = build_gpt_model(cfg.model, cfg.parallel)
        load_with_experts_renumbered(teacher, teacher_state)
        load_with_experts_renumbered(student, student_state)
        ep_rank, local_experts = expert_layout(student)
        rank = parallel_state.get_data_parallel_rank()
        mine = [{key: value[rank:rank + 1] for key, value in batch.items()} for batch in batches]
        reports = distillation_step(TeacherStudentStage(student, teacher), iter(mine), MICRO_BATCHES, 1,
                                    cfg.model.seq_length, DistillationLoss("kl"))
        return dict(reports=reports, grads={global_expert_name(name, ep_rank, local_experts): param.grad
                                            for name, param in student.named_parameters()})
    finally:
        parallel.destroy()


def test_ep2_matches_single_process():
    cfg = small_config()
    batches = micro_batches(cfg.model)
    with single_process(cfg.parallel):
        teacher = build_gpt_model(cfg.model, cfg.parallel)
        student = build_gpt_model(cfg.model, cfg.parallel)
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            student.load_state_dict(teacher.state_dict())
            for param in student.parameters():
                param.add_(0.02 * torch.randn(param.shape, generator=generator))
        teacher_state, student_state = ({key: value.clone() if torch.is_tensor(value) else value
                                         for key, value in model.state_dict().items()}
                                        for model in (teacher, student))
        ref_kl, ref_grads = plain_kl_and_grads(student, teacher, batches)
    results = run_distributed(_ep2_rank, 2, teacher_state, student_state, batches, timeout_s=300)
    kl = sum(sum_reports(result["reports"])["kl"][0].item() for result in results)
    assert ref_kl > 1e-3
    assert kl == pytest.approx(ref_kl, rel=KL_RTOL)
    grads = {}
    for result in results:
        for name, grad in result["grads"].items():
            grads[name] = grads[name] + grad if name in grads else grad
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=EP_RTOL, atol=EP_ATOL, msg=name)


# TP=2 (with sequence parallelism, which megatron.core needs for MoE layers): the quantized
# student of the other tests. Dynamic NVFP4 amaxes are MAX-reduced over the tensor-parallel group,
# so every quantizer sees the TP=1 scale and no rounding flips at this seed; what remains is the
# fp32 summation order of the split GEMMs, the sequence-parallel gathers / reduce-scatters, the
# row-parallel reductions and the vocab-parallel softmax. Measured against the single-process
# reference at seeds 0-3 (see KL_RTOL): KL at most 4.3e-5 relative (the fp32-KL error described
# above KL_RTOL), gradients need at most 1.1e-7 absolute at rtol 1e-5 (largest gradient ~0.13;
# 4.5x under TP_GRAD_ATOL); TP=2 x PP=2, measured at seed 0 only, as TP=2. Norm and router weights
# are not split: under sequence parallelism each rank holds the gradient of its half of the
# tokens, summed here as finalize_model_grads all-reduces it.
TP2 = ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]
TP_KL_RTOL = KL_RTOL
TP_GRAD_RTOL, TP_GRAD_ATOL = 1e-5, 5e-7


def _shard(full: torch.Tensor, dim: int, stride: int, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s shard of ``full`` as megatron.core splits it: ``world * stride`` chunks along
    ``dim``, rank r holding chunks r, r + world, ... (stride 2: SwiGLU fc1, [gate part; up part])."""
    chunks = full.chunk(world * stride, dim=dim)
    return torch.cat([chunks[s * world + rank] for s in range(stride)], dim=dim).clone()


def _unshard(shards: list, dim: int, stride: int) -> torch.Tensor:
    """Inverse of :func:`_shard` over all ranks' shards."""
    pieces = [shard.chunk(stride, dim=dim) for shard in shards]
    return torch.cat([pieces[rank][s] for s in range(stride) for rank in range(len(shards))], dim=dim)


def _load_tp_sharded(model, full_state: dict, rename=lambda name: name) -> None:
    """Load a TP=1 state dict (keys mapped by ``rename``) into this rank's tensor-parallel model."""
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    world = parallel_state.get_tensor_model_parallel_world_size()
    params = dict(model.named_parameters())
    state = {}
    for key in model.state_dict():
        value, param = full_state[rename(key)], params.get(key)
        if param is not None and getattr(param, "tensor_model_parallel", False):
            value = _shard(value, param.partition_dim, param.partition_stride, rank, world)
        state[key] = value
    model.load_state_dict(state)


def _tp_rank(overrides: list, teacher_state: dict, batches: list):
    from megatron.core import parallel_state

    cfg = small_config(*overrides)
    parallel.initialize(cfg.parallel, backend="gloo")
    try:
        teacher = build_gpt_model(cfg.model, cfg.parallel)
        rename = global_namer(teacher)

        student = build_gpt_model(cfg.model, cfg.parallel)
        _load_tp_sharded(teacher, teacher_state, rename)
        _load_tp_sharded(student, teacher_state, rename)
        quantize.apply(student, dynamic_policy())
        stage = TeacherStudentStage(student, teacher)
        reports = distillation_step(stage, iter(batches), MICRO_BATCHES, MICRO_BATCH_SIZE,
                                    cfg.model.seq_length, DistillationLoss("kl"))
        grads, layout = {}, {}
        for name, param in student.named_parameters():
            grads[rename(name)] = param.grad
            if getattr(param, "tensor_model_parallel", False):
                layout[rename(name)] = ("split", param.partition_dim, param.partition_stride)
            elif getattr(param, "sequence_parallel", False):
                layout[rename(name)] = ("partial",)
            else:
                layout[rename(name)] = ("replicated",)
        return dict(reports=reports, grads=grads, layout=layout, post_process=stage.post_process,
                    tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                    pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
                    teacher_grads=sum(param.grad is not None for param in teacher.parameters()))
    finally:
        parallel.destroy()


def _gather_tp_grads(tp_ranks: list) -> dict:
    """Full-weight gradients from the ranks of one tensor-parallel group: split parameters
    un-sharded, sequence-parallel partial sums added (what ``finalize_model_grads`` all-reduces),
    replicated ones checked equal on the ranks."""
    first = tp_ranks[0]
    assert all(r["layout"] == first["layout"] for r in tp_ranks)
    grads = {}
    for name, kind in first["layout"].items():
        shards = [r["grads"][name] for r in tp_ranks]
        assert all(shard is not None for shard in shards), name
        if kind[0] == "split":
            grads[name] = _unshard(shards, kind[1], kind[2])
        elif kind[0] == "partial":
            grads[name] = sum(shards[1:], shards[0])
        else:
            for shard in shards[1:]:
                torch.testing.assert_close(shard, shards[0], rtol=TP_GRAD_RTOL, atol=TP_GRAD_ATOL, msg=name)
            grads[name] = shards[0]
    return grads


def _assert_tp_grads_close(got: dict, ref: dict) -> None:
    assert set(got) == set(ref)
    for name, grad in got.items():
        torch.testing.assert_close(grad, ref[name], rtol=TP_GRAD_RTOL, atol=TP_GRAD_ATOL, msg=name)


def _check_tp_layout(layout: dict) -> None:
    kinds = [kind[0] for kind in layout.values()]
    assert set(kinds) <= {"split", "partial", "replicated"}
    assert "split" in kinds and "partial" in kinds  # norms and routers: sequence-parallel partial sums
    assert any(kind[1:] == (0, 2) for kind in layout.values())  # SwiGLU fc1: [gate; up] interleave


def test_tp2_matches_single_process(tp1_reference):
    teacher_state, batches, ref_kl, ref_grads = tp1_reference
    ranks = run_distributed(_tp_rank, 2, TP2, teacher_state, batches, timeout_s=300)
    assert [r["tp_rank"] for r in ranks] == [0, 1]
    assert all(r["post_process"] and r["teacher_grads"] == 0 for r in ranks)
    _check_tp_layout(ranks[0]["layout"])
    assert ref_kl > 1e-3
    for r in ranks:  # the vocab-parallel KL is reduced over TP: both ranks report the total
        assert len(r["reports"]) == MICRO_BATCHES
        assert sum_reports(r["reports"])["kl"][0].item() == pytest.approx(ref_kl, rel=TP_KL_RTOL)
    _assert_tp_grads_close(_gather_tp_grads(ranks), ref_grads)


def test_tp2_pp2_matches_single_process(tp1_reference):
    teacher_state, batches, ref_kl, ref_grads = tp1_reference
    ranks = run_distributed(_tp_rank, 4, [*TP2, "parallel.pipeline_model_parallel_size=2"],
                            teacher_state, batches, timeout_s=300)
    stages = [sorted((r for r in ranks if r["pp_rank"] == pp), key=lambda r: r["tp_rank"]) for pp in (0, 1)]
    assert [[r["tp_rank"] for r in stage] for stage in stages] == [[0, 1], [0, 1]]
    first, last = stages
    assert not any(r["post_process"] for r in first) and all(r["post_process"] for r in last)
    assert all(r["teacher_grads"] == 0 for r in ranks)
    assert all(r["reports"] == [] for r in first)
    for r in last:
        assert len(r["reports"]) == MICRO_BATCHES
        assert sum_reports(r["reports"])["kl"][0].item() == pytest.approx(ref_kl, rel=TP_KL_RTOL)
    first_grads, last_grads = _gather_tp_grads(first), _gather_tp_grads(last)
    assert not set(first_grads) & set(last_grads)
    _assert_tp_grads_close({**first_grads, **last_grads}, ref_grads)
