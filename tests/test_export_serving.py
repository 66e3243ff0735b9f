"""A servable export: the tokenizer, chat template and ``generation_config.json`` beside the
weights, from the imported Hugging Face directory (``megatron-qad import`` keeps them in
``DIR/hf_tokenizer/``) or from the tokenizer directory a data source names.

The source is a chat model made here with transformers' own classes: a tiny ``LlamaForCausalLM``
and a WordLevel tokenizer (``tokenizers``) wrapped in ``PreTrainedTokenizerFast`` with a chat
template, whose end-of-turn token ``<|im_end|>`` is the EOS of its ``generation_config.json``.
Nothing is downloaded. It is imported with ``configs/tiny_cpu.yaml`` as the base recipe,
calibrated (a ``ptq`` run: NVFP4 weights and inputs, FP8 K/V) and exported in both formats.
"""

import json
from pathlib import Path

import pytest
import torch

from megatron_qad.cli import main
from megatron_qad.config import load_config
from megatron_qad.export import export
from megatron_qad.export.serving import IMPORTED_DIR

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[1]
SPECIAL = ["<unk>", "<|im_start|>", "<|im_end|>"]
WORDS = "user assistant system hello world the a cat dog sat on mat what is it".split()
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
IM_START, IM_END = 1, 2
GENERATION = {"bos_token_id": IM_START, "eos_token_id": IM_END, "pad_token_id": IM_END, "do_sample": True,
              "temperature": 0.7}
"""The source's generation settings: a chat model stops at its end-of-turn token."""
RUN = ["model.seq_length=16", "training.global_batch_size=2", "training.micro_batch_size=2", "training.eval_iters=1",
       "distill.calibration_iters=1", "data.sources=[{type: random}]"]


def chat_tokenizer():
    """A WordLevel tokenizer over :data:`WORDS` with ChatML-style special tokens and a chat template."""
    vocab = {token: index for index, token in enumerate(SPECIAL + WORDS)}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", bos_token="<|im_start|>",
                                                eos_token="<|im_end|>", pad_token="<|im_end|>",
                                                chat_template=CHAT_TEMPLATE)


def chat_model(directory: Path) -> Path:
    """A tiny Llama chat model (config.json names another EOS than its generation config: the
    generation config is what an engine stops on) with its tokenizer, saved by transformers."""
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=32, max_position_embeddings=64,
                                      bos_token_id=IM_START, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.generation_config = transformers.GenerationConfig(**GENERATION)
    model.save_pretrained(directory)
    chat_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """(the source directory, the imported recipe, the calibrated run's checkpoint.save)."""
    from megatron_qad.train import run

    tmp = tmp_path_factory.mktemp("serving")
    source = chat_model(tmp / "hf")
    assert main(["import", str(source), "--out", str(tmp / "teacher"),
                 "--recipe", str(ROOT / "configs" / "tiny_cpu.yaml")]) == 0
    recipe = tmp / "teacher" / "recipe.yaml"
    run(load_config(recipe, [*RUN, f"checkpoint.save={tmp / 'run'}"]), "ptq")
    return source, recipe, tmp / "run"


def exported(run_dir, export_format: str, *overrides: str) -> Path:
    source, recipe, save = run_dir
    return export(load_config(recipe, [*RUN, f"checkpoint.save={save}", f"export.format={export_format}",
                                       f"export.dir={save.parent / export_format}", *overrides]))


def test_the_import_keeps_the_tokenizer_chat_template_and_generation_config(run_dir):
    source, recipe, _ = run_dir
    kept = recipe.parent / IMPORTED_DIR
    assert sorted(path.name for path in kept.iterdir()) == ["chat_template.jinja", "generation_config.json",
                                                            "tokenizer.json", "tokenizer_config.json"]
    for path in kept.iterdir():
        assert path.read_bytes() == (source / path.name).read_bytes()
    assert json.loads((kept / "generation_config.json").read_text())["eos_token_id"] == IM_END


def test_an_import_without_a_generation_config_takes_its_token_ids_from_config_json(run_dir, tmp_path, capsys):
    """A Hugging Face directory with weights and config.json only: hf_tokenizer/ gets the
    generation config transformers would derive (config.json's BOS / EOS), and the import says so."""
    source = tmp_path / "hf"
    source.mkdir()
    for name in ("config.json", "model.safetensors"):
        (source / name).write_bytes((run_dir[0] / name).read_bytes())
    assert main(["import", str(source), "--out", str(tmp_path / "teacher")]) == 0
    kept = tmp_path / "teacher" / IMPORTED_DIR
    assert capsys.readouterr().out.splitlines()[-1] == f"for exports: generation_config.json in {kept}"
    assert json.loads((kept / "generation_config.json").read_text()) == {"bos_token_id": IM_START, "eos_token_id": 0}


def test_transformers_serves_the_compressed_tensors_export_from_its_directory_alone(run_dir, capsys, monkeypatch):
    """AutoModelForCausalLM and AutoTokenizer from the export directory only (offline): the chat
    template renders a prompt, the model generates from it and stops on the source's end-of-turn
    token (its generation config)."""
    out = exported(run_dir, "compressed_tensors")
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"export: tokenizer, chat template and generation config from "
        f"'{run_dir[1].parent / IMPORTED_DIR}' (teacher.checkpoint)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.generation_config.eos_token_id == IM_END and tokenizer.eos_token_id == IM_END
    assert model.generation_config.temperature == GENERATION["temperature"]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "what is the cat"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert prompt["input_ids"][0].tolist() == [IM_START, 3, 15, 16, 8, 10, IM_END, IM_START, 4]
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    new = generated[0, prompt["input_ids"].shape[1]:]
    assert 1 <= len(new) <= 4 and all(0 <= token < model.config.vocab_size for token in new.tolist())
    assert isinstance(tokenizer.decode(new), str)


def test_the_modelopt_export_carries_the_same_files(run_dir):
    """transformers does not read modelopt weights (docs/EXPORT.md); the tokenizer and generation
    config beside them load from the directory alone."""
    out = exported(run_dir, "modelopt")
    kept = run_dir[1].parent / IMPORTED_DIR
    for path in kept.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes()
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == CHAT_TEMPLATE
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == IM_END


def test_without_an_imported_teacher_the_recipes_tokenizer_serves(run_dir, tmp_path, capsys):
    """A teacher without hf_tokenizer/ (a Megatron-LM checkpoint) and a data source whose tokenizer
    is a Hugging Face directory without generation_config.json: the export copies the tokenizer
    and writes a generation config with its BOS / EOS / PAD ids."""
    tokenizer_dir = tmp_path / "tokenizer"
    chat_tokenizer().save_pretrained(tokenizer_dir)
    (tmp_path / "text.txt").write_text("hello world the cat sat on the mat\n")
    source = f"{{type: text, paths: ['{tmp_path / 'text.txt'}'], tokenizer: '{tokenizer_dir}'}}"
    out = exported(run_dir, "compressed_tensors", f"teacher.checkpoint={tmp_path / 'megatron_teacher'}",
                   f"data.validation_sources=[{source}]")
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"export: tokenizer, chat template and generation config from '{tokenizer_dir}' "
        f"(data.validation_sources[0].tokenizer)")
    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": IM_START, "eos_token_id": IM_END, "pad_token_id": IM_END}
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == CHAT_TEMPLATE


def test_an_export_with_nothing_to_copy_says_so_in_one_line(run_dir, tmp_path, capsys):
    out = exported(run_dir, "modelopt", f"teacher.checkpoint={tmp_path / 'megatron_teacher'}")
    assert capsys.readouterr().out.splitlines()[-1].startswith(
        "export: no tokenizer, chat template or generation_config.json to copy: teacher.checkpoint has no "
        "hf_tokenizer/")
    assert sorted(path.name for path in out.iterdir()) == ["config.json", "hf_quant_config.json", "model.safetensors"]
