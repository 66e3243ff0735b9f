"""``megatron-qad export``: the NVFP4 Hugging Face checkpoint of a student, read back independently.

The reader here decodes the exported bytes with its own E2M1 table and reassembles Megatron's fused
QKV (per query group: its query heads, then K, then V) and gated fc1 ([gate; up]) from the HF
pieces; the result must be the student's fake-quantized weight bit for bit.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distributed_helpers import single_process
from torchrun_helpers import torchrun
from megatron_qad import quantize
from megatron_qad.config import ConfigError, load_config
from megatron_qad.export import export
from megatron_qad.models import build_model
from megatron_qad.train import checkpointing, run

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
SMALL = ["model.num_layers=2", "model.seq_length=32", "training.global_batch_size=4", "training.micro_batch_size=2",
         "training.eval_iters=1", "distill.calibration_iters=1", "data.sources=[{type: random}]",
         "teacher.pretrain_iters=4"]
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def decode_nvfp4(packed: torch.Tensor, block_scales: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    """fp32 [N, K] from uint8 [N, K/2] codes (element 2i low nibble, sign bit 3), E4M3 [N, K/16]
    block scales and the fp32 tensor scale: code value x block scale x tensor scale."""
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2).long()
    values = E2M1[codes & 7] * torch.where(codes >= 8, -1.0, 1.0)
    blocks = block_scales.float().repeat_interleave(16, dim=-1)
    return values * blocks * tensor_scale.float()


def reassemble(tensors: dict, module: str, kind: str, groups: int, read) -> torch.Tensor:
    """The Megatron-layout weight of ``module`` from its HF pieces, each read by ``read(prefix)``."""
    if kind == "qkv":
        q, k, v = (read(f"{module}.self_attn.{p}_proj").reshape(groups, -1, read(f"{module}.self_attn.q_proj").shape[-1])
                   for p in "qkv")
        return torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])
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
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight", "model.layers.0.mlp.gate.weight"):
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


def test_hybrid_models_are_refused_by_name():
    from megatron_qad.export.hf_names import module_map

    hybrid = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny_hybrid_cpu.yaml")
    with pytest.raises(ConfigError, match="'model.hybrid_layer_pattern' is 'MEME\\*M\\*E'.*not available yet"):
        module_map(hybrid.model)
