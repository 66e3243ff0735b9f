"""``megatron-qad inspect``: the report on stdout, exit code 2 and a one-line message for bad input."""

import subprocess
import sys
from pathlib import Path

from megatron_qad.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")
TINY_HYBRID = str(ROOT / "configs" / "tiny_hybrid_cpu.yaml")


def test_inspect_prints_config_and_table(capsys):
    assert main(["inspect", TINY]) == 0
    out = capsys.readouterr().out
    assert "model: num_layers=4 hidden_size=128" in out
    assert "model: GPTModel, 2,428,032 parameters" in out
    assert "rel MSE nvfp4" in out and "rel MSE 4/6" in out
    assert "decoder.layers.3.mlp.experts.local_experts.3.linear_fc2  moe_expert" in out
    summary = out.rstrip().splitlines()[-1]
    assert summary.startswith("policy transformer: 2,162,688 of 2,428,032 parameters (89.1%) in NVFP4")
    assert summary.endswith("K/V in FP8 in 4 attention modules")


def test_inspect_hybrid_recipe_keeps_attention_and_its_mamba_in_bf16(capsys):
    """Pattern MEME*M*E: attention layers 4 and 6, their nearest Mamba layers 2 and 5 stay BF16."""
    assert main(["inspect", TINY_HYBRID]) == 0
    rows = {line.split()[0]: line.split()[1:4] for line in capsys.readouterr().out.splitlines()
            if line.startswith("decoder.layers.")}
    assert rows["decoder.layers.0.mixer.in_proj"] == ["mamba_mixer", "nvfp4", "nvfp4"]
    for name in ("decoder.layers.2.mixer.in_proj", "decoder.layers.5.mixer.out_proj",
                 "decoder.layers.4.self_attention.linear_qkv", "decoder.layers.6.self_attention.linear_proj"):
        assert rows[name][1:] == ["bf16", "bf16"], name
    assert rows["decoder.layers.7.mlp.shared_experts.linear_fc1"] == ["shared_expert", "nvfp4", "nvfp4"]


def test_bad_quantization_settings_exit_2(capsys):
    assert main(["inspect", TINY, "quantization.kv_cache=fp4"]) == 2
    assert "'quantization.kv_cache'" in capsys.readouterr().err
    assert main(["inspect", TINY, "quantization.policy=null", "quantization.format=nvfp4_4over6"]) == 2
    assert "quantization.policy is not set" in capsys.readouterr().err
    assert main(["inspect", TINY, "quantization.policy=null", "quantization.format=null"]) == 0
    assert "policy custom: 0 of" in capsys.readouterr().out


def test_overrides_change_the_model(capsys):
    assert main(["inspect", TINY, "model.num_layers=1", "model.num_moe_experts=2"]) == 0
    out = capsys.readouterr().out
    assert "(overrides: model.num_layers=1 model.num_moe_experts=2)" in out
    assert "decoder.layers.0.mlp.experts.local_experts.1" in out
    assert "decoder.layers.1." not in out and "local_experts.2" not in out


def test_bad_key_exits_2_with_the_message_and_no_traceback(capsys):
    assert main(["inspect", TINY, "model.hiden_size=64"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == ("megatron-qad: error: unknown key 'model.hiden_size'; "
                                    "did you mean 'model.hidden_size'?")
    assert captured.out == ""


def test_bad_recipe_file_and_unbuildable_setting_exit_2(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(Path(TINY).read_text().replace("hidden_size: 128", "hidden_size: 100"))
    assert main(["inspect", str(recipe)]) == 2
    assert "'model.hidden_size' (100)" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["inspect", TINY, "model.transformer_impl=transformer_engine"]) == 2
    assert "set model.transformer_impl=local" in capsys.readouterr().err


def test_unknown_subcommand_exits_2(capsys):
    assert main(["train-everything"]) == 2
    assert "invalid choice: 'train-everything'" in capsys.readouterr().err
    assert main([]) == 2


def test_console_module_exit_codes():
    """The installed entry point calls main(); ``python -m megatron_qad.cli`` exercises the same path."""
    ok = subprocess.run([sys.executable, "-m", "megatron_qad.cli", "inspect", TINY, "model.num_layers=1"],
                        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "policy transformer:" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "megatron_qad.cli", "inspect", TINY, "parallel.foo=1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "unknown key 'parallel.foo'" in bad.stderr


def test_every_command_has_help(capsys):
    """``megatron-qad --help`` and ``megatron-qad COMMAND --help`` print their usage and exit 0."""
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: megatron-qad [-h] COMMAND ...") and "'megatron-qad COMMAND --help'" in out
    assert [line.split()[0] for line in out.splitlines() if line.startswith("    ") and not line.startswith("     ")] \
        == ["inspect", "train", "ptq", "eval", "export", "import"]
    for command in ("train", "ptq", "eval", "export", "inspect", "import"):
        assert main([command, "--help"]) == 0, command
        out = capsys.readouterr().out
        assert out.startswith(f"usage: megatron-qad {command} [-h] ") and "options:" in out, command
