"""The NVFP4 hooks under tensor and expert parallelism: two gloo processes against one.

TP=2 (with sequence parallelism, which megatron.core needs for MoE layers) must quantize every
weight exactly as TP=1 does, because the per-tensor amax is MAX-reduced over the tensor-parallel
group; EP=2 must give every expert the scale of its own weight, as EP=1 does.
"""

from pathlib import Path

import pytest
import torch
from megatron.core import parallel_state, tensor_parallel

from distributed_helpers import run_distributed, single_process
from model_helpers import build_at_layout, global_expert_name, make_batches
from megatron_qad import parallel, quantize
from megatron_qad.config import load_config
from megatron_qad.models import build_gpt_model
from megatron_qad.numerics import nvfp4

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
SMALL = ["model.params_dtype=float32", "model.num_layers=2", "model.seq_length=32"]
TP2 = ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]
EP2 = ["parallel.expert_model_parallel_size=2"]
SCALED_EXPERT = "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1"

# Logits of the quantized models at TP=2 (or EP=2) vs TP=1: the GEMM tolerance test_models_cpu.py
# uses for the unquantized model. Sequence parallelism and the row-parallel reduction change the
# fp32 summation order (activations differ by ~1e-7 relative); an NVFP4 input quantizer could turn
# such a difference into one rounding step of one element, but at this seed none does (measured:
# max |diff| 4e-7 for logits of scale ~1; at model.seed 1234-1237 the logits need at most 2.2e-7
# absolute at rtol 1e-5, and EP=2 is bit for bit). Quantizing each shard with its own amax
# instead of the TP-reduced one moves these logits by ~0.2.
LOGITS_RTOL, LOGITS_ATOL = 1e-5, 1e-5
# Calibrated amaxes: maxima of activations, equal up to the same summation-order noise (measured
# at model.seed 1234-1237: at most 7.4e-7 relative at TP=2; bit-identical on the first layer's
# input and at EP=2).
AMAX_RTOL = 1e-5


def _quantize_and_measure(model, model_cfg, ep_rank: int, local_experts: int) -> dict:
    """Apply the transformer policy; return fake-quantized weights (by EP=1 name) with their
    sharding, the raw weights, the calibrated amaxes and the full-vocabulary logits."""
    def rename(name):
        return global_expert_name(name, ep_rank, local_experts)

    quantize.apply(model, "transformer")
    fq_weights, weights, layout = {}, {}, {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if getattr(module, "weight_quantizer", None) is not None:
                fq_weights[rename(name)] = module.weight_quantizer(module.weight).clone()
                weights[rename(name)] = module.weight.detach().clone()
                layout[rename(name)] = (module.weight.partition_dim, module.weight.partition_stride)
    batches = make_batches(model_cfg)
    quantize.calibrate(model, batches)
    amaxes = {rename(key[:-len(".amax")]): value.clone()
              for key, value in model.state_dict().items() if key.endswith(".amax")}
    with torch.no_grad():
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(model(*batches[0]))
    return {"fq_weights": fq_weights, "weights": weights, "layout": layout, "amaxes": amaxes, "logits": logits}


def _expert_scale_independence(model, ep_rank: int) -> dict:
    """Multiply global expert 0's fc1 weight by 10 (on its EP rank) and report which local experts'
    fake-quantized fc1 weights changed, on every rank."""
    experts = model.decoder.layers[0].mlp.experts.local_experts
    with torch.no_grad():
        before = [e.linear_fc1.weight_quantizer(e.linear_fc1.weight).clone() for e in experts]
        if ep_rank == 0:
            experts[0].linear_fc1.weight.mul_(10)
        after = [e.linear_fc1.weight_quantizer(e.linear_fc1.weight).clone() for e in experts]
        own = nvfp4.fake_quantize(experts[0].linear_fc1.weight) if ep_rank == 0 else None
    return {"changed": [not torch.equal(b, a) for b, a in zip(before, after)],
            "scaled_fq": after[0] if ep_rank == 0 else None, "scaled_own_fq": own}


def _run_quantized_layout(overrides: list[str], state_dict_path: str | None) -> dict:
    """In a child process: build the small fp32 model at this layout (optionally loading the EP=1
    weights, experts renumbered), quantize, calibrate and measure."""
    config = load_config(TINY, SMALL + overrides)
    context = parallel.initialize(config.parallel, seed=config.model.seed)
    try:
        model, ep_rank, local_experts = build_at_layout(config, context.device, state_dict_path)
        result = _quantize_and_measure(model, config.model, ep_rank, local_experts)
        result.update(tp_rank=parallel_state.get_tensor_model_parallel_rank(), ep_rank=ep_rank,
                      local_experts=local_experts)
        if state_dict_path:
            result.update(_expert_scale_independence(model, ep_rank))
        return result
    finally:
        parallel.destroy()


def _unshard(shards: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Undo megatron.core's CPU-initialisation split: the master weight is cut along ``dim`` into
    ``world * stride`` chunks and rank r holds chunks r, r + world, ... (stride 2: SwiGLU fc1, so
    that every rank has [gate part; up part])."""
    pieces = [shard.chunk(stride, dim=dim) for shard in shards]
    return torch.cat([pieces[rank][s] for s in range(stride) for rank in range(len(shards))], dim=dim)


@pytest.fixture(scope="module")
def tp1_reference(tmp_path_factory):
    """The small fp32 model in one process: its state dict file and its measurements."""
    config = load_config(TINY, SMALL)
    with single_process(config.parallel, seed=config.model.seed):
        model = build_gpt_model(config.model, config.parallel)
        path = tmp_path_factory.mktemp("tp1") / "model.pt"
        torch.save(model.state_dict(), path)
        result = _quantize_and_measure(model, config.model, 0, config.model.num_moe_experts)
    return path, result


def test_tp1_reference_quantizes_each_weight_with_its_own_amax(tp1_reference):
    _, reference = tp1_reference
    assert len(reference["fq_weights"]) == 2 * (2 + 2 * 4 + 2)  # per layer: attention, 4 experts, shared
    for name, fq in reference["fq_weights"].items():
        assert torch.equal(fq, nvfp4.fake_quantize(reference["weights"][name])), name


def test_tp2_quantizes_weights_bit_for_bit_as_tp1_and_calibrates_the_same_amaxes(tp1_reference):
    _, reference = tp1_reference
    ranks = run_distributed(_run_quantized_layout, 2, TP2, None)
    assert [r["tp_rank"] for r in ranks] == [0, 1]
    assert ranks[0]["fq_weights"].keys() == reference["fq_weights"].keys()
    for name, (dim, stride) in ranks[0]["layout"].items():
        assert dim in (0, 1), name
        weight = _unshard([r["weights"][name] for r in ranks], dim, stride)
        assert torch.equal(weight, reference["weights"][name]), f"{name}: TP=2 weights differ from TP=1"
        fq = _unshard([r["fq_weights"][name] for r in ranks], dim, stride)
        assert torch.equal(fq, reference["fq_weights"][name]), f"{name}: NVFP4 weight differs from TP=1"
        # The shard alone, quantized with its own amax, is not the TP=1 result for some weight:
        # checked below over all weights, so the test above is not passing by luck.
    local = [_unshard([nvfp4.fake_quantize(r["weights"][name]) for r in ranks], *ranks[0]["layout"][name])
             for name in reference["fq_weights"]]
    assert not all(torch.equal(fq, reference["fq_weights"][name])
                   for fq, name in zip(local, reference["fq_weights"]))

    assert ranks[0]["amaxes"].keys() == ranks[1]["amaxes"].keys() == reference["amaxes"].keys()
    assert len(reference["amaxes"]) == 2 * (2 + 2 * 4 + 2 + 2)  # linear inputs + K and V per layer
    for name, amax in reference["amaxes"].items():
        assert torch.equal(ranks[0]["amaxes"][name], ranks[1]["amaxes"][name]), name
        torch.testing.assert_close(ranks[0]["amaxes"][name], amax, rtol=AMAX_RTOL, atol=0, msg=name)
    # The embedding output enters the first QKV projection: no GEMM before it, so it is exact.
    first = "decoder.layers.0.self_attention.linear_qkv.input_quantizer"
    assert torch.equal(ranks[0]["amaxes"][first], reference["amaxes"][first])

    for r in ranks:
        torch.testing.assert_close(r["logits"], reference["logits"], rtol=LOGITS_RTOL, atol=LOGITS_ATOL)


def test_ep2_gives_every_expert_its_own_scale_as_ep1_does(tp1_reference):
    path, reference = tp1_reference
    ranks = run_distributed(_run_quantized_layout, 2, EP2, str(path))
    assert [r["ep_rank"] for r in ranks] == [0, 1] and all(r["local_experts"] == 2 for r in ranks)
    experts = {}
    for r in ranks:
        experts.update({name: fq for name, fq in r["fq_weights"].items() if ".local_experts." in name})
    reference_experts = {name: fq for name, fq in reference["fq_weights"].items() if ".local_experts." in name}
    assert experts.keys() == reference_experts.keys() and len(experts) == 2 * 4 * 2
    for name, fq in reference_experts.items():
        assert torch.equal(experts[name], fq), f"{name}: EP=2 NVFP4 weight differs from EP=1"
    for r in ranks:
        for name, amax in reference["amaxes"].items():
            if name in r["amaxes"]:
                torch.testing.assert_close(r["amaxes"][name], amax, rtol=AMAX_RTOL, atol=0, msg=name)
        torch.testing.assert_close(r["logits"], reference["logits"], rtol=LOGITS_RTOL, atol=LOGITS_ATOL)

    # Global expert 0 (rank 0, local 0) scaled by 10: its fake-quantized weight changes, and is
    # the NVFP4 of the scaled weight with its own amax; no other expert's, on either rank, moves.
    assert ranks[0]["changed"] == [True, False]
    assert ranks[1]["changed"] == [False, False]
    assert torch.equal(ranks[0]["scaled_fq"], ranks[0]["scaled_own_fq"])
