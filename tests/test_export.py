"""``megatron-qad export``: the NVFP4 Hugging Face checkpoint of a student, read back independently.

The reader here decodes the exported bytes with its own E2M1 table and reassembles Megatron's fused
QKV (per query group: its query heads, then K, then V) and gated fc1 ([gate; up]) from the HF
pieces; the result must be the student's fake-quantized weight bit for bit. Hybrid students are
read in Nemotron-H names, written out by hand here, and the exported shapes are checked against
the shapes Hugging Face's ``NemotronHForCausalLM`` builds from the exported ``config.json``.
"""

import dataclasses
import itertools
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distributed_helpers import single_process
from torchrun_helpers import torchrun
from megatron_qad import quantize
from megatron_qad.config import ConfigError, load_config
from megatron_qad.export import export, export_tensors, write_checkpoint
from megatron_qad.export.hf_names import hf_config, module_map
from megatron_qad.export.writer import FLOAT32_TENSORS
from megatron_qad.models import build_model, transformer_config
from megatron_qad.train import checkpointing, run

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
TINY_HYBRID = Path(__file__).resolve().parents[1] / "configs" / "tiny_hybrid_cpu.yaml"
SMALL = ["model.num_layers=2", "model.seq_length=32", "training.global_batch_size=4", "training.micro_batch_size=2",
         "training.eval_iters=1", "distill.calibration_iters=1", "data.sources=[{type: random}]",
         "teacher.pretrain_iters=4", "model.moe_shared_expert_gate=true"]
"""The tiny recipe's GPT-MoE with its shared experts gated, as Qwen2-MoE's are."""
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def decode_nvfp4(packed: torch.Tensor, block_scales: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    """fp32 [N, K] from uint8 [N, K/2] codes (element 2i low nibble, sign bit 3), E4M3 [N, K/16]
    block scales and the fp32 tensor scale: code value x block scale x tensor scale."""
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2).long()
    values = E2M1[codes & 7] * torch.where(codes >= 8, -1.0, 1.0)
    blocks = block_scales.float().repeat_interleave(16, dim=-1)
    return values * blocks * tensor_scale.float()


def join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """Megatron's fused QKV rows from HF's q / k / v projections: per query group, its query heads,
    then its key head, then its value head."""
    return torch.cat([p.reshape(groups, -1, p.shape[-1]) for p in (q, k, v)], dim=1).reshape(-1, q.shape[-1])


def reassemble(tensors: dict, module: str, kind: str, groups: int, read) -> torch.Tensor:
    """The Megatron-layout weight of ``module`` from its HF pieces, each read by ``read(prefix)``."""
    if kind == "qkv":
        return join_qkv(*(read(f"{module}.self_attn.{p}_proj") for p in "qkv"), groups)
    if kind == "fc1":
        return torch.cat([read(f"{module}.gate_proj"), read(f"{module}.up_proj")])
    return read(module)


def megatron_to_hf(name: str) -> tuple[str, str]:
    """(HF module prefix, kind) of a Megatron linear module, written out by hand for the tiny model."""
    layer, rest = name.removeprefix("decoder.layers.").split(".", 1)
    base = f"model.layers.{layer}"
    if rest == "self_attention.linear_qkv":
        return base, "qkv"
    if rest == "self_attention.linear_proj":
        return f"{base}.self_attn.o_proj", "plain"
    rest = rest.replace("mlp.experts.local_experts.", "mlp.experts.").replace("mlp.shared_experts", "mlp.shared_expert")
    mlp, fc = rest.rsplit(".", 1)
    return (f"{base}.{mlp}", "fc1") if fc == "linear_fc1" else (f"{base}.{mlp}.down_proj", "plain")


def fake_quantized_student(config, source: Path) -> dict[str, torch.Tensor]:
    """{Megatron linear name: the student's fake-quantized weight} and its static amaxes."""
    with single_process(config.parallel):
        model = build_model(config.model, config.parallel)
        quantize.apply(model, config.quantization.to_policy())
        checkpointing.load_model([model], source)
        with torch.no_grad():
            weights = {name: module.weight_quantizer(module.weight).clone() for name, module in model.named_modules()
                       if getattr(module, "weight_quantizer", None) is not None}
        amaxes = {key: value.clone() for key, value in model.state_dict().items() if key.endswith(".amax")}
    return weights, amaxes


@pytest.fixture(scope="module", params=["nvfp4", "nvfp4_4over6"])
def exported(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    overrides = [*SMALL, f"teacher.checkpoint={tmp / 'teacher'}", f"checkpoint.save={tmp / 'run'}",
                 f"quantization.format={request.param}"]
    run(load_config(RECIPE, overrides), "ptq")
    config = load_config(RECIPE, overrides)
    out = export(config)
    return config, out, *fake_quantized_student(config, tmp / "run" / "ptq")


def test_export_dequantizes_to_the_students_fake_quantized_weights(exported):
    config, out, weights, _ = exported
    tensors = load_file(out / "model.safetensors")
    groups = config.model.num_query_groups
    assert weights
    for name, fake_quantized in weights.items():
        prefix, kind = megatron_to_hf(name)

        def read(module):
            assert tensors[f"{module}.weight"].dtype == torch.uint8
            assert tensors[f"{module}.weight_scale"].dtype == torch.float8_e4m3fn
            return decode_nvfp4(tensors[f"{module}.weight"], tensors[f"{module}.weight_scale"],
                                tensors[f"{module}.weight_scale_2"])

        restored = reassemble(tensors, prefix, kind, groups, read)
        assert torch.equal(restored, fake_quantized.float()), name


def test_export_scales_are_the_hooks_scales(exported):
    config, out, _, amaxes = exported
    tensors = load_file(out / "model.safetensors")
    for key, amax in amaxes.items():
        if ".input_quantizer." in key:
            prefix, kind = megatron_to_hf(key.split(".input_quantizer.")[0])
            module = {"qkv": f"{prefix}.self_attn.q_proj", "fc1": f"{prefix}.gate_proj"}.get(kind, prefix)
            assert tensors[f"{module}.input_scale"].item() == pytest.approx(amax.item() / (6 * 448), rel=1e-6)
        else:  # core_attention.{key,value}_quantizer.amax: the FP8 KV cache
            layer = key.removeprefix("decoder.layers.").split(".")[0]
            which = "k" if ".key_quantizer." in key else "v"
            scale = tensors[f"model.layers.{layer}.self_attn.{which}_scale"]
            assert scale.dtype == torch.float32 and scale.item() == pytest.approx(amax.item() / 448, rel=1e-6)


def test_export_metadata_and_bf16_layers(exported):
    config, out, _, _ = exported
    tensors = load_file(out / "model.safetensors")
    quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "NVFP4" and quant["group_size"] == 16 and quant["kv_cache_quant_algo"] == "FP8"
    assert quant["exclude_modules"] == ["lm_head"]
    hf = json.loads((out / "config.json").read_text())
    assert hf["quantization_config"]["quant_algo"] == "NVFP4"
    assert hf["num_hidden_layers"] == config.model.num_layers and hf["num_experts"] == config.model.num_moe_experts
    assert hf["model_type"] == "qwen2_moe" and hf["norm_topk_prob"] is True
    assert hf["shared_expert_intermediate_size"] == config.model.moe_shared_expert_intermediate_size
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight", "model.layers.0.mlp.gate.weight",
                 "model.layers.0.mlp.shared_expert_gate.weight"):
        assert tensors[name].dtype == torch.bfloat16, name
    assert not any(name.endswith(".tmp") for name in map(str, out.parent.iterdir()))


def test_export_needs_a_student(tmp_path):
    config = load_config(RECIPE, [*SMALL, f"teacher.checkpoint={tmp_path / 't'}", f"checkpoint.save={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="holds no student checkpoint"):
        export(config)


def test_export_of_a_tensor_parallel_run_gathers_the_shards(exported, tmp_path):
    """A PTQ student calibrated at TP=2 (two processes) exports to the TP=1 export's weights bit
    for bit (same teacher weights, global weight amax); its calibrated input scales agree up to
    the rounding of split GEMMs."""
    config, out, _, _ = exported
    if config.quantization.format != "nvfp4":
        pytest.skip("one format suffices")
    overrides = [*SMALL, f"teacher.checkpoint={config.teacher.checkpoint}", f"checkpoint.save={tmp_path / 'run'}",
                 "parallel.tensor_model_parallel_size=2"]
    torchrun(2, "-m", "megatron_qad.cli", "ptq", str(RECIPE), *overrides)
    tp2 = load_file(export(load_config(RECIPE, overrides)) / "model.safetensors")
    tp1 = load_file(out / "model.safetensors")
    assert tp2.keys() == tp1.keys()
    for name, tensor in tp1.items():
        if name.endswith(("input_scale", "k_scale", "v_scale")):
            assert tp2[name].item() == pytest.approx(tensor.item(), rel=1e-3), name
        else:
            assert torch.equal(tp2[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


def test_a_large_export_is_sharded_with_the_hugging_face_index(exported, tmp_path):
    """Above ``export.max_shard_gib`` the tensors go to numbered files named by an index; their
    union is the single-file export, byte for byte."""
    config, out, _, _ = exported
    config.export.dir, config.export.max_shard_gib = str(tmp_path / "sharded"), 2e-4  # ~210 KB per file
    sharded = export(config)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (sharded / "model.safetensors").exists()
    union = {}
    for filename in files:
        part = load_file(sharded / filename)
        assert {name for name, f in index["weight_map"].items() if f == filename} == part.keys()
        union.update(part)
    single = load_file(out / "model.safetensors")
    assert union.keys() == single.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in single.values())
    for name, tensor in single.items():
        assert torch.equal(union[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name



def test_the_compressed_tensors_export_holds_the_modelopt_exports_values(exported, tmp_path):
    """``export.format: compressed_tensors`` on the same run: every ModelOpt tensor is there under
    its compressed-tensors name with the same bytes (codes, block scales, BF16 tensors), the tensor
    and input scales are the reciprocals of ModelOpt's (float32 [1]; the reciprocal of a
    reciprocal is the original to within 1 ulp), and nothing else; no hf_quant_config.json."""
    config, out, _, _ = exported
    if config.quantization.format != "nvfp4":
        pytest.skip("one format suffices")
    ct_dir = export(dataclasses.replace(config, export=dataclasses.replace(
        config.export, dir=str(tmp_path / "ct"), format="compressed_tensors", max_shard_gib=5.0)))
    ct, modelopt = load_file(ct_dir / "model.safetensors"), load_file(out / "model.safetensors")
    renamed = {".weight_scale_2": ".weight_global_scale", ".input_scale": ".input_global_scale"}
    expected = set()
    for name, tensor in modelopt.items():
        suffix = next((s for s in renamed if name.endswith(s)), None)
        if suffix is not None:
            ct_name = name.removesuffix(suffix) + renamed[suffix]
            assert ct[ct_name].shape == (1,) and ct[ct_name].dtype == torch.float32, name
            assert ct[ct_name].item() == pytest.approx(1 / tensor.item(), rel=2**-23), name
        else:
            packed = tensor.dtype == torch.uint8 and name.endswith(".weight")
            ct_name = name.removesuffix(".weight") + ".weight_packed" if packed else name
            assert torch.equal(ct[ct_name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name
        expected.add(ct_name)
    assert set(ct) == expected
    assert not (ct_dir / "hf_quant_config.json").exists()
    quant = json.loads((ct_dir / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["kv_cache_scheme"]["num_bits"] == 8


# ---------------------------------------------------------------------------------------------
# GPT-MoE students in Qwen2-MoE names: routing and the gated shared expert.

GATED = ["model.num_layers=1", "model.moe_shared_expert_gate=true"]


def megatron_config_of(config, **routing):
    """The megatron.core TransformerConfig the student of ``config`` is built with, ``routing`` replaced."""
    return dataclasses.replace(transformer_config(config.model, config.parallel, torch.device("cpu")), **routing)


def qwen2_moe_routing(logits: torch.Tensor, topk: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face Qwen2-MoE's routing, written out: softmax over all experts' logits, the top-k,
    divided by their sum when ``norm_topk_prob``. Returns (weights [tokens, topk], expert indices)."""
    scores = torch.softmax(logits.float(), dim=-1)
    weights, experts = torch.topk(scores, topk, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def qwen2_moe_block(x: torch.Tensor, tensors: dict, layer: int, hf: dict) -> torch.Tensor:
    """Hugging Face ``Qwen2MoeSparseMoeBlock`` of layer ``layer``, written out on the exported tensors:
    the routed experts' SwiGLU MLPs weighted by :func:`qwen2_moe_routing`, plus the shared expert
    scaled by sigmoid(shared_expert_gate(x)). ``x``: [tokens, hidden]."""
    block = f"model.layers.{layer}.mlp"

    def mlp(prefix, inputs):
        gate, up, down = (tensors[f"{prefix}.{p}_proj.weight"] for p in ("gate", "up", "down"))
        return (torch.nn.functional.silu(inputs @ gate.T) * (inputs @ up.T)) @ down.T

    weights, experts = qwen2_moe_routing(x @ tensors[f"{block}.gate.weight"].T, hf["num_experts_per_tok"],
                                         hf["norm_topk_prob"])
    out = torch.zeros_like(x)
    for token in range(x.shape[0]):
        for weight, expert in zip(weights[token], experts[token].tolist()):
            out[token] += weight * mlp(f"{block}.experts.{expert}", x[token:token + 1])[0]
    shared = torch.sigmoid(x @ tensors[f"{block}.shared_expert_gate.weight"].T) * mlp(f"{block}.shared_expert", x)
    return out + shared


@pytest.mark.parametrize("pre_softmax, norm_topk_prob", [(False, True), (True, False)])
def test_qwen2_moe_norm_topk_prob_follows_the_megatron_router(pre_softmax, norm_topk_prob):
    """Megatron's default router (softmax over the top-k logits) is Qwen2-MoE with renormalised
    top-k weights; its pre-softmax router (softmax over all experts, as chosen) is Qwen2-MoE without."""
    config = load_config(RECIPE, GATED)
    hf = hf_config(config.model, megatron_config_of(config, moe_router_pre_softmax=pre_softmax))
    assert hf["architectures"] == ["Qwen2MoeForCausalLM"] and hf["norm_topk_prob"] is norm_topk_prob
    assert (hf["num_experts"], hf["num_experts_per_tok"], hf["moe_intermediate_size"],
            hf["shared_expert_intermediate_size"]) == (4, 2, 256, 256)
    assert (hf["decoder_sparse_step"], hf["mlp_only_layers"], hf["qkv_bias"]) == (1, [], False)


@pytest.mark.parametrize("pre_softmax", [False, True])
def test_megatron_routing_is_qwen2_moe_routing_with_the_exported_norm_topk_prob(pre_softmax):
    """The probabilities and routing map of a megatron.core router (the tiny student's layer-0 router
    weights) equal Qwen2-MoE's routing, written out by hand, at the exported ``norm_topk_prob``."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    config = load_config(RECIPE, GATED)
    with single_process(config.parallel):
        model = build_model(config.model, config.parallel).eval()
        router = model.decoder.layers[0].mlp.router
        megatron_config = dataclasses.replace(router.config, moe_router_pre_softmax=pre_softmax)
        if pre_softmax:  # a megatron.core router of that config, with the student's weights
            router = type(router)(config=megatron_config, pg_collection=get_default_pg_collection()).eval()
            router.load_state_dict(model.decoder.layers[0].mlp.router.state_dict())
        hidden = torch.randn(16, 2, config.model.hidden_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            probs, routing_map = router(hidden)
        norm_topk_prob = hf_config(config.model, megatron_config)["norm_topk_prob"]
        weights, experts = qwen2_moe_routing(hidden.reshape(-1, config.model.hidden_size) @ router.weight.T,
                                             config.model.moe_router_topk, norm_topk_prob)
    expected = torch.zeros_like(probs).scatter(1, experts, weights)
    assert torch.equal(routing_map, expected > 0)
    torch.testing.assert_close(probs, expected, rtol=1e-6, atol=1e-7)
    if not pre_softmax:
        assert torch.allclose(probs.sum(dim=-1), torch.ones(32))


def test_a_gated_shared_expert_exports_as_qwen2_moe_shared_expert_gate(tmp_path):
    """The quantized student's shared-expert gate is written, unquantized in BF16, as
    ``shared_expert_gate.weight``: its megatron.core ``gate_weight``, which the quantization leaves alone."""
    config = load_config(RECIPE, ["model.num_layers=2", "model.moe_shared_expert_gate=true"])
    with single_process(config.parallel):
        model = build_model(config.model, config.parallel)
        quantize.apply(model, config.quantization.to_policy())
        gates = {i: layer.mlp.shared_experts.gate_weight.detach().clone()
                 for i, layer in enumerate(model.decoder.layers)}
        out = write_checkpoint(model, config.model, tmp_path / "hf_nvfp4")
    tensors = load_file(out / "model.safetensors")
    exclude = json.loads((out / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    assert len(gates) == 2
    for i, gate in gates.items():
        name = f"model.layers.{i}.mlp.shared_expert_gate"
        assert gate.shape == (1, config.model.hidden_size)
        assert tensors[f"{name}.weight"].dtype == torch.bfloat16 and f"{name}.weight_scale" not in tensors
        assert torch.equal(tensors[f"{name}.weight"], gate.bfloat16()), name
        assert name not in exclude  # like the router: not a quantizable linear
        assert tensors[f"model.layers.{i}.mlp.shared_expert.down_proj.weight"].dtype == torch.uint8  # NVFP4


@pytest.mark.parametrize("gate", [True, False])
def test_the_exported_qwen2_moe_block_computes_the_megatron_moe_layer(gate):
    """One MoE layer of an unquantized student (fp32) against Hugging Face's Qwen2-MoE block written
    out on its exported tensors: routing, routed experts and the shared expert agree, gated (its
    gate exported) or not (a zero gate, sigmoid 0 = 1/2, and a doubled down_proj)."""
    config = load_config(RECIPE, ["model.num_layers=1", f"model.moe_shared_expert_gate={str(gate).lower()}"])
    with single_process(config.parallel):
        model = build_model(config.model, config.parallel).eval()
        tensors, _ = export_tensors(model, config.model, torch.float32)
        hf = hf_config(config.model, model.config)
        hidden = torch.randn(8, 2, config.model.hidden_size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            megatron, _ = model.decoder.layers[0].mlp(hidden)
            shared = model.decoder.layers[0].mlp.shared_experts(hidden)
    x = hidden.reshape(-1, config.model.hidden_size)
    assert shared.abs().max() > 0.1 * megatron.abs().max()  # the shared expert weighs in the sum
    torch.testing.assert_close(qwen2_moe_block(x, tensors, 0, hf), megatron.reshape(x.shape), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("routing, message", [
    ({"moe_router_score_function": "sigmoid"}, "'model.moe_router_score_function' is 'sigmoid'.*softmax"),
    ({"moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True},
     "'model.moe_router_enable_expert_bias' is true"),
    ({"moe_router_topk_scaling_factor": 2.5}, "'model.moe_router_topk_scaling_factor' is 2.5"),
    ({"moe_router_num_groups": 2, "moe_router_group_topk": 1}, "moe_router_num_groups = 2"),
    ({"moe_expert_capacity_factor": 1.0}, "moe_expert_capacity_factor = 1.0"),
])
def test_routers_qwen2_moe_cannot_express_are_refused(routing, message):
    config = load_config(RECIPE, GATED)
    with pytest.raises(ConfigError, match=message):
        hf_config(config.model, megatron_config_of(config, **routing))


@pytest.mark.parametrize("overrides, message", [
    (["model.activation=gelu"], "'model.activation' is 'gelu'.*swiglu"),
    (["model.add_bias_linear=true"], "'model.add_bias_linear' is true"),
])
def test_gpt_moe_layouts_qwen2_moe_cannot_hold_are_refused_by_key(overrides, message):
    config = load_config(RECIPE, [*GATED, *overrides])
    with pytest.raises(ConfigError, match=message):
        module_map(config.model)
    with pytest.raises(ConfigError, match=message):
        hf_config(config.model, megatron_config_of(config))


@pytest.mark.parametrize("experts", ["per_expert", "grouped_gemm"])
def test_a_te_spec_recipe_exports_on_the_cpu_what_the_local_spec_exports(exported, tmp_path, experts):
    """Export builds megatron.core's local spec (per-expert SequentialMLP) whatever
    ``model.transformer_impl`` and ``model.moe_grouped_gemm`` say, so a TE-spec recipe exports on a
    machine without a GPU or Transformer Engine, and writes the same tensors. (That a TE-spec
    student's checkpoint, grouped experts included, holds the local spec's tensors is checked with
    Transformer Engine on the GPU, in test_te_spec.py.)"""
    config, out, _, _ = exported
    if config.quantization.format != "nvfp4":
        pytest.skip("one format suffices")
    overrides = [*SMALL, f"teacher.checkpoint={config.teacher.checkpoint}", f"checkpoint.save={config.checkpoint.save}",
                 "model.transformer_impl=transformer_engine", f"export.dir={tmp_path / 'te'}",
                 f"model.moe_grouped_gemm={str(experts == 'grouped_gemm').lower()}"]
    te_spec = load_file(export(load_config(RECIPE, overrides)) / "model.safetensors")
    local = load_file(out / "model.safetensors")
    assert te_spec.keys() == local.keys()
    for name, tensor in local.items():
        assert torch.equal(te_spec[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


def test_an_ungated_shared_expert_exports_with_a_zero_gate_and_a_doubled_tensor_scale(tmp_path):
    """NVFP4 student whose shared expert has no gate: the HF gate is zero and the shared down_proj's
    tensor scale is twice the hooks' (its dequantized weight twice the fake-quantized one, bit for
    bit). The layer's function is checked by the Qwen2-MoE block test above."""
    config = load_config(RECIPE, ["model.num_layers=1"])
    assert config.model.moe_shared_expert_intermediate_size and not config.model.moe_shared_expert_gate
    with single_process(config.parallel):
        model = build_model(config.model, config.parallel)
        quantize.apply(model, config.quantization.to_policy())
        down = model.decoder.layers[0].mlp.shared_experts.linear_fc2
        with torch.no_grad():
            fake_quantized = down.weight_quantizer(down.weight).clone()
        out = write_checkpoint(model, config.model, tmp_path / "hf_nvfp4")
    tensors = load_file(out / "model.safetensors")
    gate = tensors["model.layers.0.mlp.shared_expert_gate.weight"]
    assert gate.shape == (1, config.model.hidden_size) and not gate.any()
    name = "model.layers.0.mlp.shared_expert.down_proj"
    restored = decode_nvfp4(tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"],
                            tensors[f"{name}.weight_scale_2"])
    assert torch.equal(restored, 2 * fake_quantized.float())


def test_a_gpt_moe_without_shared_expert_needs_no_gate():
    config = load_config(RECIPE, ["model.num_layers=1", "model.moe_shared_expert_intermediate_size=0"])
    hf = hf_config(config.model, megatron_config_of(config))
    assert hf["shared_expert_intermediate_size"] == 0 and hf["norm_topk_prob"] is True
    assert not any("shared_expert" in name for name in module_map(config.model))


# ---------------------------------------------------------------------------------------------
# Hybrid (Mamba) students in Nemotron-H names.

HYBRID = ["model.hybrid_layer_pattern=ME-M*M*E"]
"""Every Nemotron-H layer kind. Under the hybrid policy the attention layers 4 and 6 and the Mamba
layers feeding them (3 and 5) stay BF16; Mamba layer 0, the MLP and the experts are NVFP4."""
BF16_LINEARS = sorted([*(f"backbone.layers.{i}.mixer.{p}_proj" for i in (3, 5) for p in ("in", "out")),
                       *(f"backbone.layers.{i}.mixer.{p}_proj" for i in (4, 6) for p in "qkvo"), "lm_head"])
_LAYER_RENAMES = {
    "input_layernorm.weight": "norm.weight", "pre_mlp_layernorm.weight": "norm.weight",
    "mixer.conv1d_weight": "mixer.conv1d.weight", "mixer.conv1d_bias": "mixer.conv1d.bias",
    "self_attention.linear_proj.weight": "mixer.o_proj.weight",
    "mlp.linear_fc1.weight": "mixer.up_proj.weight", "mlp.linear_fc2.weight": "mixer.down_proj.weight",
    "mlp.router.weight": "mixer.gate.weight", "mlp.router.expert_bias": "mixer.gate.e_score_correction_bias",
    "mlp.shared_experts.linear_fc1.weight": "mixer.shared_experts.up_proj.weight",
    "mlp.shared_experts.linear_fc2.weight": "mixer.shared_experts.down_proj.weight",
}


def nemotron_h_name(name: str) -> str:
    """The Nemotron-H name of a Megatron parameter or buffer of a hybrid model, written out by hand
    (the fused ``linear_qkv`` has three: see :func:`join_qkv`)."""
    whole_model = {"embedding.word_embeddings.weight": "backbone.embeddings.weight",
                   "decoder.final_norm.weight": "backbone.norm_f.weight", "output_layer.weight": "lm_head.weight"}
    if name in whole_model:
        return whole_model[name]
    layer, rest = name.removeprefix("decoder.layers.").split(".", 1)
    expert = re.fullmatch(r"mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight", rest)
    if expert:
        rest = f"mixer.experts.{expert[1]}.{'up' if expert[2] == '1' else 'down'}_proj.weight"
    # A Mamba layer's norm and its mixer's in_proj, out_proj, A_log, D, dt_bias and gated norm keep their names.
    return f"backbone.layers.{layer}.{_LAYER_RENAMES.get(rest, rest)}"


def nemotron_h_weight_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor ``NemotronHForCausalLM`` of ``config`` (a config.json) loads, by the
    formulas of transformers' modeling_nemotron_h.py (per-expert names, as checkpoints store them)."""
    c = config
    hidden, inner, heads = c["hidden_size"], c["mamba_num_heads"] * c["mamba_head_dim"], c["mamba_num_heads"]
    conv_dim = inner + 2 * c["n_groups"] * c["ssm_state_size"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    mixers = {
        "M": {"in_proj.weight": (inner + conv_dim + heads, hidden), "conv1d.weight": (conv_dim, 1, c["conv_kernel"]),
              "conv1d.bias": (conv_dim,), "A_log": (heads,), "D": (heads,), "dt_bias": (heads,), "norm.weight": (inner,),
              "out_proj.weight": (hidden, inner)},
        "*": {"q_proj.weight": (q, hidden), "k_proj.weight": (kv, hidden), "v_proj.weight": (kv, hidden),
              "o_proj.weight": (hidden, q)},
        "-": {"up_proj.weight": (c["intermediate_size"], hidden), "down_proj.weight": (hidden, c["intermediate_size"])},
        "E": {"gate.weight": (c["n_routed_experts"], hidden), "gate.e_score_correction_bias": (c["n_routed_experts"],),
              "shared_experts.up_proj.weight": (c["moe_shared_expert_intermediate_size"], hidden),
              "shared_experts.down_proj.weight": (hidden, c["moe_shared_expert_intermediate_size"]),
              **{f"experts.{e}.{p}_proj.weight": shape for e in range(c["n_routed_experts"]) for p, shape in
                 (("up", (c["moe_intermediate_size"], hidden)), ("down", (hidden, c["moe_intermediate_size"])))}},
    }
    shapes = {"backbone.embeddings.weight": (c["vocab_size"], hidden), "backbone.norm_f.weight": (hidden,),
              "lm_head.weight": (c["vocab_size"], hidden)}
    for i, symbol in enumerate(c["hybrid_override_pattern"]):
        shapes[f"backbone.layers.{i}.norm.weight"] = (hidden,)
        shapes.update({f"backbone.layers.{i}.mixer.{name}": shape for name, shape in mixers[symbol].items()})
    return shapes


def read_linear(tensors: dict, module: str) -> torch.Tensor:
    """fp32 weight of the HF linear ``module``: decoded when NVFP4 (uint8 codes), else as stored."""
    weight = tensors[f"{module}.weight"]
    if weight.dtype != torch.uint8:
        return weight.float()
    return decode_nvfp4(weight, tensors[f"{module}.weight_scale"], tensors[f"{module}.weight_scale_2"])


def give_distinct_values(model: torch.nn.Module) -> None:
    """Norm weights and D start as ones and the expert bias as zeros, so a mix-up among them would
    go unseen: give every 1-D parameter and the expert bias distinct random values."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
            if tensor.dim() == 1 and (isinstance(tensor, torch.nn.Parameter) or name.endswith("expert_bias")):
                tensor.copy_(torch.randn(tensor.shape, generator=generator))


def set_static_amaxes(model: torch.nn.Module) -> None:
    """Calibration runs the model forward, which the Mamba layers cannot do on the CPU (their scan
    exists only as GPU kernels): set every static input / K / V amax directly, a distinct value each."""
    quantizers = [m for m in model.modules() if hasattr(m, "amax_ready") and m.amax_mode == "static"]
    assert quantizers
    for index, quantizer in enumerate(quantizers):
        quantizer.amax.fill_(0.5 + 0.125 * index)
        quantizer.amax_ready = True


@pytest.fixture(scope="module")
def hybrid_export(tmp_path_factory):
    """The export of a quantized tiny hybrid student (the recipe's Nemotron-H routing, TP=1), and
    that student's fake-quantized weights {NVFP4 linear: (BF16, fp32)} and tensors (state dict)."""
    config = load_config(TINY_HYBRID, HYBRID)
    assert config.model.moe_router_score_function == "sigmoid" and config.model.moe_router_enable_expert_bias
    with single_process(config.parallel):
        model = build_model(config.model, config.parallel)
        quantize.apply(model, config.quantization.to_policy())
        give_distinct_values(model)
        set_static_amaxes(model)
        out = write_checkpoint(model, config.model, tmp_path_factory.mktemp("hybrid") / "hf_nvfp4")
        with torch.no_grad():  # the BF16 weight the student computes with, and its exact fp32 value
            fake_quantized = {name: (module.weight_quantizer(module.weight), module.weight_quantizer(module.weight.float()))
                              for name, module in model.named_modules()
                              if getattr(module, "weight_quantizer", None) is not None}
        state = {name: tensor.clone() for name, tensor in model.state_dict().items() if isinstance(tensor, torch.Tensor)}
    return config, out, fake_quantized, state


def test_hybrid_export_holds_every_nemotron_h_tensor_in_its_shape(hybrid_export):
    """The exported tensors are those NemotronHForCausalLM of the exported config.json loads, in its
    shapes (NVFP4 codes hold two values a byte), plus the scales of the NVFP4 linears and the K / V
    scales of the attention layers, and nothing else."""
    config, out, fake_quantized, _ = hybrid_export
    tensors = load_file(out / "model.safetensors")
    shapes = nemotron_h_weight_shapes(json.loads((out / "config.json").read_text()))
    nvfp4 = {nemotron_h_name(f"{name}.weight").removesuffix(".weight") for name in fake_quantized}
    attention = [f"backbone.layers.{i}.mixer" for i, s in enumerate(config.model.hybrid_layer_symbols) if s == "*"]
    expected = {*shapes, *(f"{m}.{s}" for m in nvfp4 for s in ("weight_scale", "weight_scale_2", "input_scale")),
                *(f"{m}.{s}_scale" for m in attention for s in "kv")}
    assert set(tensors) == expected
    assert all(f"{m}.weight" in shapes for m in nvfp4)
    for name, shape in shapes.items():
        stored = tuple(tensors[name].shape)
        if name.removesuffix(".weight") in nvfp4:
            assert tensors[name].dtype == torch.uint8 and stored == (shape[0], shape[1] // 2), name
            assert tuple(tensors[name.replace(".weight", ".weight_scale")].shape) == (shape[0], shape[1] // 16), name
        else:
            assert stored == shape, name


def test_hybrid_export_dequantizes_to_the_students_fake_quantized_weights(hybrid_export):
    """Bit for bit: the decoded export is the fake quantization's exact (fp32) value, whose BF16
    rounding is the weight the BF16 student computes with."""
    _, out, fake_quantized, _ = hybrid_export
    tensors = load_file(out / "model.safetensors")
    assert any(".mixer.in_proj" in name for name in fake_quantized)  # Mamba layer 0 is NVFP4
    for name, (in_forward, exact) in fake_quantized.items():
        module = nemotron_h_name(f"{name}.weight").removesuffix(".weight")
        assert tensors[f"{module}.weight"].dtype == torch.uint8, name
        decoded = read_linear(tensors, module)
        assert torch.equal(decoded, exact), name
        assert in_forward.dtype == torch.bfloat16 and torch.equal(decoded.bfloat16(), in_forward), name


def test_hybrid_export_keeps_the_other_tensors_exactly(hybrid_export):
    """BF16 linears (QKV reassembled from q / k / v), norms, embedding, router, Mamba convolution
    and SSM parameters equal the student's: in its dtype, except A_log, D and the expert bias,
    which the checkpoint holds in fp32 (HF Nemotron-H's dtype for them) with the same values."""
    config, out, fake_quantized, state = hybrid_export
    tensors = load_file(out / "model.safetensors")
    groups = config.model.num_query_groups
    quantized = {f"{name}.weight" for name in fake_quantized}
    others = [name for name in state if name not in quantized and not name.endswith(".amax")]
    assert {state[name].dtype for name in others} == {torch.bfloat16, torch.float32}
    for name in others:
        if name.endswith("linear_qkv.weight"):
            mixer = f"backbone.layers.{name.split('.')[2]}.mixer"
            exported = join_qkv(*(tensors[f"{mixer}.{p}_proj.weight"] for p in "qkv"), groups)
        else:
            exported = tensors[nemotron_h_name(name)]
        dtype = torch.float32 if nemotron_h_name(name).endswith(FLOAT32_TENSORS) else state[name].dtype
        assert exported.dtype == dtype and torch.equal(exported, state[name].to(dtype)), name


def test_hybrid_export_scales_are_the_students_amaxes(hybrid_export):
    _, out, _, state = hybrid_export
    tensors = load_file(out / "model.safetensors")
    amaxes = {name: amax for name, amax in state.items() if name.endswith(".amax")}
    assert any(".mixer.in_proj.input_quantizer" in name for name in amaxes)
    for name, amax in amaxes.items():
        if ".input_quantizer." in name:
            module = nemotron_h_name(name.replace(".input_quantizer.amax", ".weight")).removesuffix(".weight")
            assert tensors[f"{module}.input_scale"].item() == pytest.approx(amax.item() / (6 * 448), rel=1e-6), name
        else:  # core_attention.{key,value}_quantizer.amax: the FP8 KV cache
            layer = name.removeprefix("decoder.layers.").split(".")[0]
            scale = tensors[f"backbone.layers.{layer}.mixer.{name.split('.')[-2][0]}_scale"]
            assert scale.dtype == torch.float32 and scale.item() == pytest.approx(amax.item() / 448, rel=1e-6), name


def test_hybrid_export_config_and_bf16_linears(hybrid_export):
    config, out, _, state = hybrid_export
    m = config.model
    hf = json.loads((out / "config.json").read_text())
    assert hf["architectures"] == ["NemotronHForCausalLM"] and hf["model_type"] == "nemotron_h"
    assert hf["hybrid_override_pattern"] == "ME-M*M*E" and hf["num_hidden_layers"] == 8
    assert (hf["hidden_size"], hf["vocab_size"], hf["intermediate_size"]) == (m.hidden_size, m.vocab_size, m.ffn_hidden_size)
    assert (hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]) == (4, 2, 32)
    assert (hf["mamba_num_heads"], hf["mamba_head_dim"], hf["n_groups"], hf["ssm_state_size"]) == (8, 32, 2, 32)
    assert hf["conv_kernel"] == state["decoder.layers.0.mixer.conv1d_weight"].shape[-1]
    assert (hf["n_routed_experts"], hf["num_experts_per_tok"], hf["moe_intermediate_size"],
            hf["moe_shared_expert_intermediate_size"]) == (4, 2, 128, 256)
    assert hf["mlp_hidden_act"] == "relu2" and hf["routed_scaling_factor"] == 2.5 and hf["norm_topk_prob"] is True
    assert (hf["n_group"], hf["topk_group"], hf["tie_word_embeddings"]) == (1, 1, False)
    assert hf["torch_dtype"] == "bfloat16"
    quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "NVFP4" and quant["kv_cache_quant_algo"] == "FP8"
    assert quant["exclude_modules"] == hf["quantization_config"]["exclude_modules"] == BF16_LINEARS


@pytest.mark.parametrize("overrides, message", [
    (["model.position_embedding_type=rope"], "'model.position_embedding_type' is 'rope'.*no position embedding"),
    (["model.normalization=LayerNorm"], "'model.normalization' is 'LayerNorm'.*RMSNorm"),
    (["model.activation=swiglu"], "'model.activation' is 'swiglu'.*not gated"),
    (["model.moe_shared_expert_intermediate_size=0"], "every Nemotron-H MoE layer has a shared expert"),
    (["model.share_embeddings_and_output_weights=true"], "'model.share_embeddings_and_output_weights' is true"),
    (["model.moe_shared_expert_gate=true"],
     "'model.moe_shared_expert_gate' is true.*Nemotron-H shared experts have no gate"),
])
def test_hybrid_layouts_nemotron_h_cannot_hold_are_refused_by_key(overrides, message):
    model_cfg = load_config(TINY_HYBRID, overrides).model
    with pytest.raises(ConfigError, match=message):
        module_map(model_cfg)
    with pytest.raises(ConfigError, match=message):
        hf_config(model_cfg, transformer_config(model_cfg, load_config(TINY_HYBRID).parallel, torch.device("cpu")))


@pytest.mark.parametrize("routing, message", [
    ({"moe_router_score_function": "softmax", "moe_router_enable_expert_bias": False},
     "score experts with 'softmax'.*NemotronH routes by sigmoid scores"),
    ({"moe_router_score_function": "sigmoid", "moe_router_num_groups": 2, "moe_router_group_topk": 1},
     "pick experts by groups"),
])
def test_hybrid_routers_nemotron_h_cannot_reproduce_are_refused(routing, message):
    config = load_config(TINY_HYBRID)
    megatron_config = dataclasses.replace(transformer_config(config.model, config.parallel, torch.device("cpu")),
                                          **routing)
    with pytest.raises(ConfigError, match=message):
        hf_config(config.model, megatron_config)


def test_a_softmax_routed_hybrid_student_is_refused_before_anything_is_written(tmp_path):
    config = load_config(TINY_HYBRID, ["model.hybrid_layer_pattern=M*E", "model.num_layers=3",
                                       "model.moe_router_score_function=softmax",
                                       "model.moe_router_enable_expert_bias=false"])
    with single_process(config.parallel):
        model = build_model(config.model, config.parallel)
        quantize.apply(model, config.quantization.to_policy())
        with pytest.raises(ConfigError, match="moe_router_score_function"):
            write_checkpoint(model, config.model, tmp_path / "hf_nvfp4")
    assert list(tmp_path.iterdir()) == []


def test_the_expert_bias_goes_through_a_checkpoint_into_the_export(tmp_path):
    """The route ``megatron-qad export`` takes: the student's router expert bias (float32 buffer)
    is saved in its dist checkpoint, loaded into a fresh student, and written as
    ``e_score_correction_bias`` in float32 with its values."""
    config = load_config(TINY_HYBRID, ["model.hybrid_layer_pattern=M*E", "model.num_layers=3"])
    with single_process(config.parallel):
        model = build_model(config.model, config.parallel)
        quantize.apply(model, config.quantization.to_policy())
        give_distinct_values(model)
        set_static_amaxes(model)
        bias = model.decoder.layers[2].mlp.router.expert_bias.clone()
        checkpointing.save_model([model], tmp_path / "student")
        fresh = build_model(config.model, config.parallel)
        quantize.apply(fresh, config.quantization.to_policy())
        checkpointing.load_model([fresh], tmp_path / "student")
        out = write_checkpoint(fresh, config.model, tmp_path / "hf_nvfp4")
    exported = load_file(out / "model.safetensors")["backbone.layers.2.mixer.gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32 and bias.abs().min() > 0
    assert exported.dtype == torch.float32 and torch.equal(exported, bias)


@pytest.mark.parametrize("export_format", ["modelopt", "compressed_tensors"])
def test_a_router_without_expert_bias_exports_a_zero_e_score_correction_bias(tmp_path, export_format):
    """NemotronH's router always adds ``e_score_correction_bias``; a student whose sigmoid router has
    none (``model.moe_router_enable_expert_bias: false``) exports zeros (float32 [experts]) for every
    MoE layer, so no engine is left with an uninitialised one."""
    config = load_config(TINY_HYBRID, [*HYBRID, "model.moe_router_enable_expert_bias=false"])
    with single_process(config.parallel):
        model = build_model(config.model, config.parallel)
        assert model.decoder.layers[1].mlp.router.expert_bias is None
        quantize.apply(model, config.quantization.to_policy())
        set_static_amaxes(model)
        out = write_checkpoint(model, config.model, tmp_path / "hf", export_format=export_format)
    tensors = load_file(out / "model.safetensors")
    biases = {name: tensor for name, tensor in tensors.items() if name.endswith("e_score_correction_bias")}
    assert set(biases) == {f"backbone.layers.{i}.mixer.gate.e_score_correction_bias" for i in (1, 7)}
    for tensor in biases.values():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, torch.zeros(config.model.num_moe_experts))
