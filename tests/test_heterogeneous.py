"""DeciLM (Llama-Nemotron-Super) models: per-layer blocks from a ``block_configs`` file, built with
megatron.core's heterogeneous layers, quantized and distilled.

The tiny model's six blocks (``decilm_helpers``) hold every kind of part a DeciLM block has: attention
with 2 and with 4 K/V groups, attention replaced by one linear layer, no attention, MLPs of three
widths, an MLP replaced by one linear layer, no MLP, and a block with neither part. The expected MLP widths come
from the published DeciLM modeling code's rule, computed here on its own: ``int(2 * ffn_mult *
hidden / 3)`` rounded up to a multiple of 256. transformers 5.24 has no DeciLM class, so
megatron.core's ``HeterogeneousTransformerConfig`` is the independent reading the file is checked
against.

CPU runtime: about 35 s on 2 cores (one 2-process gloo job for TP=2 and PP=2; the rest in-process).
"""

import json
from pathlib import Path

import pytest
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.heterogeneous.heterogeneous_config import HeterogeneousTransformerConfig

from distill_helpers import (GRAD_RTOL, KL_RTOL, MICRO_BATCH_SIZE, MICRO_BATCHES, assert_grads_close,
                             dynamic_policy, global_namer, micro_batches, plain_kl_and_grads, student_of)
from decilm_helpers import BLOCKS, BLOCKS_FILE, FFN_WIDTHS, HEAD_DIM, HEADS, HIDDEN, QUERY_GROUPS, VOCAB, block
from distributed_helpers import run_distributed, single_process
from model_helpers import make_batches
from megatron_qad import parallel, quantize
from megatron_qad.block_configs import read_blocks
from megatron_qad.config import ConfigError, load_config
from megatron_qad.distill import (DistillationLoss, LayoutMismatchError, TeacherStudentStage, chunk_iterators,
                                  distillation_step, sum_reports)
from megatron_qad.models import build_gpt_model, decoder_layers

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"
# (type, mlp_type, attention replaced by a linear layer) of each decoder layer.
LAYER_KINDS = [("attention", "mlp", False), ("mlp", "mlp", False), ("mlp", "mlp", True),
               ("attention", None, False), ("linear", "linear", False), ("noop", None, False)]
SIZES = ["model.params_dtype=float32", "model.num_moe_experts=0", "model.moe_shared_expert_intermediate_size=0",
         f"model.hidden_size={HIDDEN}", f"model.num_attention_heads={HEADS}", "model.num_query_groups=2",
         f"model.num_layers={len(BLOCKS)}", "model.ffn_hidden_size=1024", f"model.vocab_size={VOCAB}",
         "model.seq_length=32"]


def write_blocks(directory: Path, blocks=BLOCKS, **sizes) -> Path:
    path = directory / "config.json"
    path.write_text(json.dumps({"model_type": "nemotron-nas", **sizes, "block_configs": blocks}))
    return path


def decilm_config(blocks_path: Path, *extra: str):
    return load_config(TINY, [*SIZES, f"model.heterogeneous_layers_config={blocks_path}", *extra])


@pytest.fixture(scope="module")
def blocks_path() -> Path:
    return BLOCKS_FILE


@pytest.fixture(scope="module")
def cpu_process():
    with single_process() as context:
        yield context


def expected_parameter_shapes(blocks=BLOCKS) -> dict[str, tuple[int, ...]]:
    """Every decoder parameter of the TP=1 model and its shape, from the blocks alone."""
    shapes = {}
    for i, (block, width, groups) in enumerate(zip(blocks, FFN_WIDTHS, QUERY_GROUPS)):
        layer = f"decoder.layers.{i}."
        if block["attention"]["no_op"] is False:
            shapes[layer + "input_layernorm.weight"] = (HIDDEN,)
        if block["attention"]["replace_with_linear"]:
            shapes[layer + "self_attention.weight"] = (HIDDEN, HIDDEN)
        elif groups is not None:
            shapes[layer + "self_attention.linear_qkv.weight"] = ((HEADS + 2 * groups) * HEAD_DIM, HIDDEN)
            shapes[layer + "self_attention.linear_proj.weight"] = (HIDDEN, HEADS * HEAD_DIM)
        if block["ffn"]["no_op"] is False:
            shapes[layer + "pre_mlp_layernorm.weight"] = (HIDDEN,)
        if block["ffn"]["replace_with_linear"]:
            shapes[layer + "mlp.weight"] = (HIDDEN, HIDDEN)
        elif width is not None:
            shapes[layer + "mlp.linear_fc1.weight"] = (2 * width, HIDDEN)  # SwiGLU: gate and up
            shapes[layer + "mlp.linear_fc2.weight"] = (HIDDEN, width)
    return shapes


def test_blocks_are_read_as_megatron_core_reads_them(blocks_path):
    ours = read_blocks(blocks_path, {"num_layers": len(BLOCKS), "hidden_size": HIDDEN,
                                     "num_attention_heads": HEADS, "vocab_size": VOCAB})
    theirs = HeterogeneousTransformerConfig(num_layers=len(BLOCKS), hidden_size=HIDDEN, num_attention_heads=HEADS,
                                            heterogeneous_layers_config_path=str(blocks_path),
                                            cuda_graph_modules=[]).per_block_parameters
    assert [block.ffn_hidden_size for block in ours] == FFN_WIDTHS
    assert [block.num_query_groups for block in ours] == QUERY_GROUPS
    for block, reference in zip(ours, theirs, strict=True):
        assert block.ffn_hidden_size == reference.mlp.ffn_hidden_size
        assert block.num_query_groups == reference.attention.num_query_groups
        for kind, part in ((block.attention, reference.attention), (block.ffn, reference.mlp)):
            assert (kind == "none", kind == "linear") == (part.no_op, part.replace_with_linear)


def test_the_super_49b_recipe_holds_the_published_blocks(monkeypatch):
    """49 attention blocks (8 K/V groups) and 31 without; MLP widths 2816 to 28672; 49.9B parameters."""
    monkeypatch.chdir(REPO)  # the recipe's paths start at the repository root
    config = load_config(REPO / "configs" / "llama_nemotron_super_49b.yaml")
    m = config.model
    blocks = read_blocks(m.heterogeneous_layers_config, {name: getattr(m, name) for name in (
        "num_layers", "hidden_size", "num_attention_heads", "vocab_size")})
    assert sum(block.attention == "full" for block in blocks) == 49
    assert {block.num_query_groups for block in blocks} == {8, None}
    assert sorted({block.ffn_hidden_size for block in blocks}) == [2816, 5632, 7168, 14336, 17920, 28672]
    head_dim, h = m.hidden_size // m.num_attention_heads, m.hidden_size
    params = 2 * m.vocab_size * h + h + sum(
        (h * (m.num_attention_heads + 2 * b.num_query_groups) * head_dim + m.num_attention_heads * head_dim * h + h
         if b.attention == "full" else 0) + 3 * h * b.ffn_hidden_size + h for b in blocks)
    assert round(params / 1e9, 1) == 49.9


@pytest.mark.parametrize("blocks, sizes, extra, message", [
    (BLOCKS[:5], {}, [], "5 block_configs but 'model.num_layers' is 6"),
    (BLOCKS, {"hidden_size": 512}, [], "hidden_size is 512 but 'model.hidden_size' is 256"),
    ([block("full", "full", heads_in_group=3, ffn_mult=1.0)] + BLOCKS[1:], {}, [],
     r"block_configs\[0\].attention.n_heads_in_group is 3"),
    (BLOCKS[:5] + [block("none", "none", ffn_mult=1.0)], {}, [], r"block_configs\[5\].ffn has no MLP"),
    (BLOCKS, {}, ["parallel.tensor_model_parallel_size=4", "parallel.sequence_parallel=false"],
     r"block_configs\[0\] has 2 K/V groups"),
    (BLOCKS, {}, ["model.transformer_impl=transformer_engine"], "set model.transformer_impl=local"),
])
def test_block_files_that_cannot_build_are_config_errors(tmp_path, blocks, sizes, extra, message):
    path = write_blocks(tmp_path, blocks, **sizes)
    with pytest.raises(ConfigError, match=message) as error:
        decilm_config(path, *extra)
    assert "'model.heterogeneous_layers_config'" in str(error.value)


@pytest.mark.parametrize("content, message", [
    (None, "file not found"), ("{not json", "not valid JSON"), ('{"num_hidden_layers": 6}', "no 'block_configs' list"),
])
def test_missing_or_unreadable_block_files_are_config_errors(tmp_path, content, message):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=f"'model.heterogeneous_layers_config' \\({path}\\): {message}"):
        decilm_config(path)


def _logits_and_grads(model, model_cfg) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Full-vocabulary logits [b, s, V] (gathered over TP) and the gradients of sum(logits^2) / numel."""
    logits = model(*make_batches(model_cfg, count=1)[0])
    (logits.square().sum() / (logits.numel() * parallel_state.get_tensor_model_parallel_world_size())).backward()
    return (tensor_parallel.gather_from_tensor_model_parallel_region(logits).detach(),
            {name: param.grad for name, param in model.named_parameters()})


@pytest.fixture(scope="module")
def tp1_reference(cpu_process, blocks_path):
    """The TP=1 model's state, logits and gradients."""
    config = decilm_config(blocks_path)
    model = build_gpt_model(config.model, config.parallel)
    logits, grads = _logits_and_grads(model, config.model)
    return model, logits, grads


def test_each_layer_is_built_as_its_block_says(tp1_reference):
    model, logits, grads = tp1_reference
    shapes = {name: tuple(param.shape) for name, param in model.named_parameters()
              if name.startswith("decoder.layers.")}
    assert shapes == expected_parameter_shapes()
    assert [(layer.type, layer.mlp_type, layer.attention_linear is not None)
            for layer in decoder_layers(model)] == LAYER_KINDS
    assert logits.shape == (2, 32, VOCAB) and torch.isfinite(logits).all()
    for name, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_the_transformer_policy_quantizes_every_gemm_but_the_output_layer(tp1_reference):
    model, _, _ = tp1_reference
    formats = {linear.name: (linear.kind, weight) for linear, weight, _ in quantize.plan(model, quantize.transformer())}
    attention = {f"decoder.layers.{i}.self_attention.{name}": ("attention", "nvfp4")
                 for i in (0, 3) for name in ("linear_qkv", "linear_proj")}
    mlp = {f"decoder.layers.{i}.mlp.{name}": ("mlp", "nvfp4")
           for i in (0, 1, 2) for name in ("linear_fc1", "linear_fc2")}
    linear = {"decoder.layers.2.self_attention": ("linear_replacement", "nvfp4"),
              "decoder.layers.4.mlp": ("linear_replacement", "nvfp4")}
    assert formats == {**attention, **mlp, **linear, "output_layer": ("output_layer", "bf16")}
    hybrid = {linear.name: weight for linear, weight, _ in quantize.plan(model, quantize.hybrid())}
    assert {name for name, weight in hybrid.items() if weight == "nvfp4"} == set(mlp) | set(linear)


def test_quant_report_counts_the_decilm_layers(cpu_process, blocks_path, tp1_reference):
    reference, _, _ = tp1_reference
    config = decilm_config(blocks_path)
    student = build_gpt_model(config.model, config.parallel)
    student.load_state_dict(reference.state_dict())
    report = quantize.apply(student, dynamic_policy())
    quantized = {name: size for name, size in expected_parameter_shapes().items()
                 if not name.endswith("layernorm.weight")}
    assert report.kv_fp8_modules == 2  # the two attention blocks
    assert report.nvfp4_params == sum(torch.Size(shape).numel() for shape in quantized.values())
    assert report.total_params == sum(param.numel() for param in reference.parameters())
    assert len(report.rows) == len(quantized) + 1  # and the BF16 output layer
    assert all((row.rel_mse_nvfp4 is None) == (row.weight_format == "bf16") for row in report.rows)


def test_qad_step_gives_every_student_weight_a_gradient(cpu_process, blocks_path, tp1_reference):
    reference, _, _ = tp1_reference
    config = decilm_config(blocks_path)
    state = reference.state_dict()
    teacher = build_gpt_model(config.model, config.parallel)
    teacher.load_state_dict(state)
    student = student_of(state, config)
    stage = TeacherStudentStage(student, teacher)
    batches = micro_batches(config.model)
    reports = distillation_step([stage], chunk_iterators([stage], batches), MICRO_BATCHES, MICRO_BATCH_SIZE,
                                config.model.seq_length, DistillationLoss("kl"))
    assert sum_reports(reports)["kl"][0] > 0
    for name, param in student.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
    assert all(param.grad is None for param in teacher.parameters())


def test_a_teacher_with_other_blocks_is_a_layout_mismatch(cpu_process, blocks_path, tmp_path):
    config = decilm_config(blocks_path)
    other = decilm_config(write_blocks(tmp_path, [BLOCKS[1], BLOCKS[0], *BLOCKS[2:]]))
    with pytest.raises(LayoutMismatchError, match="layer_kinds"):
        TeacherStudentStage(build_gpt_model(config.model, config.parallel),
                            build_gpt_model(other.model, other.parallel))


# TP=2 (sequence parallel) and PP=2 in one 2-process job: spawning and importing cost more than both runs.

# fp32, same weights: TP=2 sums each row-parallel GEMM's two halves in another order (measured
# max |difference| 2e-7 on logits of size ~1).
TP_RTOL, TP_ATOL = 1e-5, 1e-5
# The schedule's loss gradient T * (p_s - p_t) is fp32, the reference differentiates an fp64 KL
# (as in test_distill_layouts.py): measured max |difference| 1.2e-7 (an embedding gradient of
# ~1e-3), in 2 of 131072 elements above GRAD_ATOL.
PP_GRAD_ATOL = 5e-7


def _tp2_then_pp2_rank(blocks_path: Path, teacher_state: dict, batches: list) -> dict:
    """TP=2 (with and without sequence parallelism): logits and two gradients; then, in the same
    process group with megatron.core's groups rebuilt, PP=2: a QAD step's reports and gradients."""
    result = {}
    config = decilm_config(blocks_path, "parallel.tensor_model_parallel_size=2")
    parallel.initialize(config.parallel, backend="gloo")
    try:
        model = build_gpt_model(config.model, config.parallel)
        logits, grads = _logits_and_grads(model, config.model)
        result["tp"] = dict(rank=parallel_state.get_tensor_model_parallel_rank(), logits=logits,
                            grads={name: grads[name] for name in ("decoder.layers.2.self_attention.weight",
                                                                  "decoder.layers.4.mlp.weight")})
        config = decilm_config(blocks_path, "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=false")
        model = build_gpt_model(config.model, config.parallel)
        result["tp"]["logits_without_sp"] = _logits_and_grads(model, config.model)[0]
        parallel_state.destroy_model_parallel()
        config = decilm_config(blocks_path, "parallel.pipeline_model_parallel_size=2")
        parallel.initialize(config.parallel)  # reuses the default process group
        teacher = build_gpt_model(config.model, config.parallel)
        rename = global_namer(teacher)
        teacher.load_state_dict({key: teacher_state[rename(key)] for key in teacher.state_dict()})
        student = student_of(teacher_state, config, rename=rename)
        stage = TeacherStudentStage(student, teacher)
        reports = distillation_step([stage], chunk_iterators([stage], batches), MICRO_BATCHES, MICRO_BATCH_SIZE,
                                    config.model.seq_length, DistillationLoss("kl"))
        result["pp"] = dict(rank=parallel_state.get_pipeline_model_parallel_rank(), reports=reports,
                            layers=[(layer.index, layer.type) for layer in decoder_layers(student)],
                            grads={rename(name): param.grad for name, param in student.named_parameters()})
    finally:
        parallel.destroy()
    return result


@pytest.fixture(scope="module")
def two_process_results(cpu_process, blocks_path, tp1_reference):
    """The 2-process job's results, and the one-process QAD reference (KL, student gradients)."""
    reference, _, _ = tp1_reference
    config = decilm_config(blocks_path)
    state = {key: value.clone() if torch.is_tensor(value) else value for key, value in reference.state_dict().items()}
    teacher = build_gpt_model(config.model, config.parallel)
    teacher.load_state_dict(state)
    batches = micro_batches(config.model)
    ref_kl, ref_grads = plain_kl_and_grads(student_of(state, config), teacher, batches)
    results = run_distributed(_tp2_then_pp2_rank, 2, blocks_path, state, batches, timeout_s=300)
    return results, ref_kl, ref_grads


def test_tp2_computes_the_tp1_model(tp1_reference, two_process_results):
    """Weights drawn on the CPU and scattered to TP shards: the same logits with and without
    sequence parallelism, and the linear replacements (whose outputs go back to the residual's
    layout) get the TP=1 gradients."""
    _, logits, grads = tp1_reference
    results, _, _ = two_process_results
    for result in (r["tp"] for r in results):
        torch.testing.assert_close(result["logits"], logits, rtol=TP_RTOL, atol=TP_ATOL)
        torch.testing.assert_close(result["logits_without_sp"], logits, rtol=TP_RTOL, atol=TP_ATOL)
        rank = result["rank"]
        for name, grad in result["grads"].items():
            rows = grads[name].shape[0] // 2
            torch.testing.assert_close(grad, grads[name][rank * rows:(rank + 1) * rows], rtol=1e-4, atol=1e-8)


def test_pp2_splits_the_blocks_and_distills_as_one_process(two_process_results):
    """Stage 0 holds blocks 0-2, stage 1 blocks 3-5 (attention without MLP, a linear-only and a no-op
    block); the QAD loss and gradients are the one-process ones."""
    results, ref_kl, ref_grads = two_process_results
    first, last = sorted((r["pp"] for r in results), key=lambda r: r["rank"])
    assert first["layers"] == [(0, "attention"), (1, "mlp"), (2, "mlp")]
    assert last["layers"] == [(3, "attention"), (4, "linear"), (5, "noop")]
    assert first["reports"] == [] and len(last["reports"]) == MICRO_BATCHES
    assert sum_reports(last["reports"])["kl"][0].item() == pytest.approx(ref_kl, rel=KL_RTOL)
    assert not first["grads"].keys() & last["grads"].keys()
    assert_grads_close({**first["grads"], **last["grads"]}, ref_grads, rtol=GRAD_RTOL, atol=PP_GRAD_ATOL)
