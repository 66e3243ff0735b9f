"""Checkpoints of NVFP4 students: plain state dicts and megatron.core dist_checkpointing.

A hooked model's state dict is the BF16 model's plus the static amax buffers
(``*.input_quantizer.amax``, ``*.core_attention.{key,value}_quantizer.amax``), so a checkpoint
restores a calibrated student without calibrating again, and a BF16 checkpoint loads into a
student without touching its amaxes.

megatron.core's ``dist_checkpointing.save`` (torch_dist strategy, megatron-core 0.19.2) runs on the
CPU with :mod:`megatron_qad.cpu_support` (its writer's ``torch.cuda.synchronize()``; the writer
also needs psutil, which megatron-core does not declare: setup.py installs it), except in the test
ranks: its result queue is a ``multiprocessing`` Manager queue, whose server process a daemonic
process (the ranks of ``run_distributed``) may not start ("daemonic processes are not allowed to
have children"); a synchronous save only needs an in-process queue, which
:func:`install_in_process_result_queue` provides. Nothing else of dist_checkpointing is
replaced. Checkpoint tensors are stacked over layers (and experts), e.g.
``decoder.layers.self_attention.linear_qkv.input_quantizer.amax`` of global shape [num_layers].
"""

import queue
from pathlib import Path

import pytest
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel

from distributed_helpers import run_distributed, single_process
from model_helpers import make_batches
from megatron_qad import parallel, quantize
from megatron_qad.config import load_config
from megatron_qad.models import build_gpt_model

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
SMALL = ["model.num_layers=2", "model.seq_length=32", "model.params_dtype=bfloat16"]
FP32 = SMALL + ["model.params_dtype=float32"]
TP2 = ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]
OTHER_SEED = 4321
KV_AMAX = ("core_attention.key_quantizer.amax", "core_attention.value_quantizer.amax")


def build(overrides, seed: int | None = None, policy=None):
    """The small model (initialised from ``seed``, default the recipe's), hooked with ``policy``."""
    config = load_config(TINY, overrides)
    if seed is not None:
        config.model.seed = seed
    model = build_gpt_model(config.model, config.parallel)
    if policy is not None:
        quantize.apply(model, policy)
    return model, config.model


def amax_buffers(model) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items() if key.endswith(".amax")}


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return tensor_parallel.gather_from_tensor_model_parallel_region(model(*batch))


def install_in_process_result_queue(patch=setattr) -> None:
    """See the module doc: an in-process write-result queue for daemonic test ranks."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        patch(filesystem_async, "_results_queue", queue.Queue())


def checkpoint_keys(model, state_keys) -> set[str]:
    """The dist-checkpoint tensor keys that ``model.sharded_state_dict()`` gives ``state_keys``."""
    sharded = model.sharded_state_dict()
    missing = sorted(set(state_keys) - set(sharded))
    assert not missing, f"not in model.sharded_state_dict(): {missing}"
    return {sharded[key].key for key in state_keys}


@pytest.fixture(scope="module")
def cpu_process():
    with single_process(load_config(TINY, FP32).parallel) as context:
        yield context


@pytest.fixture
def cpu_dist_checkpointing(monkeypatch):
    install_in_process_result_queue(monkeypatch.setattr)


def test_state_dict_round_trip_restores_the_calibrated_student(cpu_process, tmp_path):
    model, model_cfg = build(FP32, policy="transformer")
    quantize.calibrate(model, make_batches(model_cfg))
    state = model.state_dict()
    assert sum(key.endswith(".amax") for key in state) == 2 * (2 + 8 + 2 + 2)
    torch.save(state, tmp_path / "student.pt")

    restored, _ = build(FP32, seed=OTHER_SEED, policy="transformer")  # other weights, no calibration
    restored.load_state_dict(torch.load(tmp_path / "student.pt"), strict=True)
    for key, amax in amax_buffers(model).items():
        assert torch.equal(restored.state_dict()[key], amax), key
    batch = make_batches(model_cfg, count=1, seed=1)[0]
    assert torch.equal(logits(restored, batch), logits(model, batch))


def test_bf16_state_dict_loads_strictly_into_a_student_and_keeps_its_amaxes(cpu_process):
    teacher, model_cfg = build(SMALL, seed=OTHER_SEED)  # a BF16 checkpoint, written before apply
    bf16_state = {key: value.clone() if isinstance(value, torch.Tensor) else value
                  for key, value in teacher.state_dict().items()}
    assert not any(key.endswith(".amax") for key in bf16_state)

    student, _ = build(SMALL, policy="transformer")
    assert next(student.parameters()).dtype == torch.bfloat16
    quantize.calibrate(student, make_batches(model_cfg, count=1))
    amaxes = amax_buffers(student)
    assert amaxes and all(torch.isfinite(a) and a > 0 for a in amaxes.values())
    student.load_state_dict(bf16_state, strict=True)  # no missing amax keys reported
    for key, amax in amax_buffers(student).items():
        assert torch.equal(amax, amaxes[key]), key
    student_state = student.state_dict()
    for key, value in bf16_state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(student_state[key], value), key
    # The student still runs on its own calibration, with the loaded weights.
    batch = make_batches(model_cfg, count=1, seed=1)[0]
    assert torch.isfinite(logits(student, batch)).all()

    # A student that was never calibrated stays uncalibrated: the BF16 checkpoint has no amax.
    fresh, _ = build(SMALL, policy="transformer")
    fresh.load_state_dict(bf16_state, strict=True)
    assert all(torch.isnan(a) for a in amax_buffers(fresh).values())
    with pytest.raises(RuntimeError, match="not calibrated"):
        logits(fresh, batch)


def _dist_round_trip(policy, checkpoint_dir: Path, model_cfg_overrides=FP32):
    """Calibrate a student, save its sharded state dict, load it into a student built from another
    seed; return (saved student, its model config, loaded student, the checkpoint's tensor metadata,
    the result of load_state_dict)."""
    model, model_cfg = build(model_cfg_overrides, policy=policy)
    quantize.calibrate(model, make_batches(model_cfg))
    checkpoint_dir.mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(checkpoint_dir))
    metadata = dist_checkpointing.load_tensors_metadata(str(checkpoint_dir))
    restored, _ = build(model_cfg_overrides, seed=OTHER_SEED, policy=policy)
    state = dist_checkpointing.load(restored.sharded_state_dict(), str(checkpoint_dir))
    result = restored.load_state_dict(state, strict=True)
    return model, model_cfg, restored, metadata, result


def test_dist_checkpoint_round_trip_of_a_student_with_linear_amaxes(cpu_process, cpu_dist_checkpointing, tmp_path):
    policy = quantize.Policy(rules=quantize.transformer().rules, kv_cache="bf16")
    model, model_cfg, restored, metadata, result = _dist_round_trip(policy, tmp_path / "ckpt")
    assert not result.missing_keys and not result.unexpected_keys
    amaxes = amax_buffers(model)
    assert len(amaxes) == 2 * (2 + 8 + 2)
    saved = {key for key in metadata if key.endswith(".amax")}
    assert checkpoint_keys(model, amaxes) == saved
    assert saved == {f"decoder.layers.{name}.input_quantizer.amax" for name in (
        "self_attention.linear_qkv", "self_attention.linear_proj", "mlp.experts.experts.linear_fc1",
        "mlp.experts.experts.linear_fc2", "mlp.shared_experts.linear_fc1", "mlp.shared_experts.linear_fc2")}
    assert metadata["decoder.layers.self_attention.linear_qkv.input_quantizer.amax"].global_shape == (2,)
    assert metadata["decoder.layers.mlp.experts.experts.linear_fc1.input_quantizer.amax"].global_shape == (2, 4)
    for key, amax in amax_buffers(restored).items():
        assert torch.equal(amax, amaxes[key]), key
    batch = make_batches(model_cfg, count=1, seed=1)[0]
    assert torch.equal(logits(restored, batch), logits(model, batch))


def test_dist_checkpoint_keeps_the_kv_cache_amaxes(cpu_process, cpu_dist_checkpointing, tmp_path):
    """K / V amaxes live on core attention, whose own sharded_state_dict holds only its softmax
    offset: the quantized class must add them, or a resumed student has uncalibrated K / V."""
    model, model_cfg, restored, metadata, _ = _dist_round_trip("transformer", tmp_path / "ckpt")
    kv_keys = {key for key in amax_buffers(model) if key.endswith(KV_AMAX)}
    assert len(kv_keys) == 4
    assert checkpoint_keys(model, kv_keys) <= set(metadata)
    batch = make_batches(model_cfg, count=1, seed=1)[0]
    assert torch.equal(logits(restored, batch), logits(model, batch))


def _tp2_dist_round_trip(checkpoint_dir: str) -> dict:
    """In a child process at TP=2: calibrate, save, load into a student from another seed, compare."""
    install_in_process_result_queue()
    config = load_config(TINY, FP32 + TP2)
    context = parallel.initialize(config.parallel, seed=config.model.seed)
    try:
        policy = quantize.Policy(rules=quantize.transformer().rules, kv_cache="bf16")
        model, model_cfg = build(FP32 + TP2, policy=policy)
        quantize.calibrate(model, make_batches(model_cfg))
        dist_checkpointing.save(model.sharded_state_dict(), checkpoint_dir)
        restored, _ = build(FP32 + TP2, seed=OTHER_SEED, policy=policy)
        state = dist_checkpointing.load(restored.sharded_state_dict(), checkpoint_dir)
        restored.load_state_dict(state, strict=True)
        batch = make_batches(model_cfg, count=1, seed=1)[0]
        return {"tp_rank": parallel_state.get_tensor_model_parallel_rank(), "device": str(context.device),
                "logits": logits(model, batch), "restored_logits": logits(restored, batch),
                "amaxes": amax_buffers(model), "restored_amaxes": amax_buffers(restored),
                "saved": {key for key in dist_checkpointing.load_tensors_metadata(checkpoint_dir)
                          if key.endswith(".amax")},
                "expected": checkpoint_keys(model, amax_buffers(model))}
    finally:
        parallel.destroy()


def test_dist_checkpoint_round_trip_at_tp2_on_two_processes(cpu_process, cpu_dist_checkpointing, tmp_path):
    (tmp_path / "ckpt").mkdir()
    ranks = run_distributed(_tp2_dist_round_trip, 2, str(tmp_path / "ckpt"), timeout_s=180)
    assert [r["tp_rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert torch.equal(r["restored_logits"], r["logits"])
        assert r["amaxes"].keys() == r["restored_amaxes"].keys() and len(r["amaxes"]) == 2 * (2 + 8 + 2)
        assert r["saved"] == r["expected"] and len(r["saved"]) == 6
        for key, amax in r["amaxes"].items():
            assert torch.equal(r["restored_amaxes"][key], amax), key
            assert torch.equal(amax, ranks[0]["amaxes"][key]), key  # TP-reduced: one value per tensor

    # The TP=2 checkpoint loads into a TP=1 student (in this process): same amaxes, and the same
    # logits up to the fp32 summation order of the TP=2 run (the GEMM tolerance of test_models_cpu.py).
    policy = quantize.Policy(rules=quantize.transformer().rules, kv_cache="bf16")
    student, model_cfg = build(FP32, seed=OTHER_SEED, policy=policy)
    state = dist_checkpointing.load(student.sharded_state_dict(), str(tmp_path / "ckpt"))
    student.load_state_dict(state, strict=True)
    assert amax_buffers(student).keys() == ranks[0]["amaxes"].keys()
    for key, amax in amax_buffers(student).items():
        assert torch.equal(amax, ranks[0]["amaxes"][key]), key
    batch = make_batches(model_cfg, count=1, seed=1)[0]
    torch.testing.assert_close(logits(student, batch), ranks[0]["logits"], rtol=1e-5, atol=1e-5)


def test_a_checkpoint_of_an_uncalibrated_student_loads_as_uncalibrated(cpu_process):
    """A student saved before calibrate() carries NaN amaxes; loading them must not count as calibrated."""
    model, model_cfg = build(FP32, policy="transformer")  # never calibrated: amaxes are NaN
    restored, _ = build(FP32, seed=OTHER_SEED, policy="transformer")
    restored.load_state_dict(model.state_dict(), strict=True)
    with pytest.raises(RuntimeError, match=r"decoder\.layers\.0\.self_attention\.linear_qkv\.input: .*not calibrated"):
        logits(restored, make_batches(model_cfg, count=1)[0])


def test_an_moe_checkpoint_in_te_spec_names_loads_into_the_local_spec(cpu_process, cpu_dist_checkpointing, tmp_path):
    """megatron.core's TE spec keeps an MoE layer's pre-MLP norm apart (``pre_mlp_layernorm.weight``);
    its local spec names it as a dense layer's fused norm (``mlp.linear_fc1.layer_norm_weight``).
    A checkpoint written under the TE names (here: the local student's, renamed as the TE spec's
    ``gpt_layer_specs`` name them) loads into the local spec, strictly, every tensor unchanged.
    (Real TE-spec checkpoints, both ways, are loaded in test_te_spec.py on the GPU.)"""
    from megatron_qad.train import checkpointing

    model, model_cfg = build(FP32, policy="transformer")
    quantize.calibrate(model, make_batches(model_cfg))
    sharded = model.sharded_state_dict()
    renamed = [value for value in sharded.values() if ".mlp.linear_fc1.layer_norm_" in value.key]
    assert {value.key for value in renamed} == {"decoder.layers.mlp.linear_fc1.layer_norm_weight"}
    for value in renamed:
        value.key = value.key.replace(".mlp.linear_fc1.layer_norm_", ".pre_mlp_layernorm.")
    dist_checkpointing.save(sharded, str(tmp_path))
    assert "decoder.layers.pre_mlp_layernorm.weight" in dist_checkpointing.load_tensors_metadata(str(tmp_path))

    restored, _ = build(FP32, seed=OTHER_SEED, policy="transformer")
    checkpointing.load_model([restored], tmp_path)
    expected = model.state_dict()
    for key, value in restored.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, expected[key]), key
    batch = make_batches(model_cfg, count=1, seed=1)[0]
    assert torch.equal(logits(restored, batch), logits(model, batch))
