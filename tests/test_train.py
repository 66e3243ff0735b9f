"""Runs from a recipe (``megatron_qad.train.run`` / ``megatron-qad train``) on the CPU, through
Megatron-LM's own training loop (``megatron.training.pretrain``).

One small teacher is trained from scratch once per module (``teacher.pretrain_iters``: a plain
``pretrain`` run writing a Megatron-LM checkpoint) and shared; every run then loads it as a user's
run loads a real teacher.
"""

import contextlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from megatron_qad import parallel
from megatron_qad.cli import main
from megatron_qad.config import ConfigError, load_config
from megatron_qad.train import checkpointing, run
from megatron_qad.train.arguments import (model_config_from_args, parallel_config_from_args,
                                          parse_megatron_args, recipe_to_argv)
from torchrun_helpers import read_summary, torchrun

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "tiny_cpu.yaml"
SMALL = ["model.num_layers=2", "model.seq_length=32", "training.global_batch_size=4",
         "training.micro_batch_size=2", "training.log_interval=1", "training.eval_iters=1",
         "distill.calibration_iters=1", "training.lr_warmup_iters=1", "data.sources=[{type: random}]"]


def small_config(tmp: Path, *overrides: str, teacher: Path | None = None):
    return load_config(RECIPE, [*SMALL, f"teacher.checkpoint={teacher or tmp / 'teacher'}",
                                f"checkpoint.save={tmp / 'run'}", *overrides])


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A teacher trained from scratch by a 'ptq' run (which also saves the calibrated student)."""
    tmp = tmp_path_factory.mktemp("teacher")
    summary = run(small_config(tmp, "teacher.pretrain_iters=8"), "ptq")
    assert summary["ptq"]["kl"] > 0 and (tmp / "run" / "ptq" / "metadata.json").is_file()
    assert (tmp / "teacher" / "latest_checkpointed_iteration.txt").read_text().strip() == "8"
    return tmp / "teacher"


def _losses(summary: dict) -> list[tuple[int, float]]:
    return [(line["iteration"], line["loss"]) for line in summary["train"]]


@pytest.mark.parametrize("overrides", [
    [],
    ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2",
     "parallel.virtual_pipeline_model_parallel_size=2", "training.use_distributed_optimizer=true",
     "model.params_dtype=bfloat16", "training.lr_decay_iters=50", "model.hybrid_layer_pattern=M*-E|M*-E|M*-E|M*-E",
     "model.num_layers=16", "model.moe_shared_expert_gate=true", "model.mamba_num_groups=2"],
    ["parallel.tensor_model_parallel_size=2", "model.norm_epsilon=1e-6", "model.rope_scaling=true",
     "training.on_nonfinite=skip", "training.max_skipped_steps=3",
     "model.rope_scaling_factor=32.0", "model.moe_router_pre_softmax=true", "model.add_qkv_bias=true",
     "model.share_embeddings_and_output_weights=true", "model.kv_channels=64", "model.activation=squared_relu",
     "model.core_attention=sdpa"],
    ["model.num_moe_experts=0", "model.moe_shared_expert_intermediate_size=0", "model.moe_ffn_hidden_size=null",
     "model.hidden_size=256",
     "model.num_layers=6", "model.ffn_hidden_size=1024", "model.vocab_size=512",
     "model.heterogeneous_layers_config={one_group_blocks}", "model.rope_scaling=true"],
], ids=["tiny", "hybrid-pp-vpp-bf16", "gpt-flags", "decilm-blocks"])
def test_a_recipe_compiles_to_megatron_flags_that_mean_the_same_model(tmp_path, monkeypatch, overrides):
    """recipe -> Megatron-LM command line -> Megatron's parser -> the same model and layout."""
    blocks = json.loads((ROOT / "configs" / "tiny_decilm.blocks.json").read_text())
    for block in blocks["block_configs"]:  # Megatron-LM's arguments take one KV group count
        if block["attention"]["n_heads_in_group"] is not None:
            block["attention"]["n_heads_in_group"] = 2
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    config = small_config(tmp_path, *(item.format(one_group_blocks=tmp_path / "blocks.json") for item in overrides))
    world_size = config.parallel.tensor_model_parallel_size * config.parallel.pipeline_model_parallel_size
    monkeypatch.setenv("WORLD_SIZE", str(world_size))  # what Megatron's parser reads (torchrun's variable)
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    argv = recipe_to_argv(config, tmp_path / "recipe.yaml", use_gpu=False, world_size=world_size)
    args = parse_megatron_args(argv)
    assert model_config_from_args(args) == config.model
    assert parallel_config_from_args(args) == config.parallel
    assert (args.lr, args.min_lr, args.train_iters) == (config.training.lr, config.training.min_lr,
                                                       config.training.train_iters)
    assert (args.qad_on_nonfinite, args.qad_max_skipped_steps) == (config.training.on_nonfinite,
                                                                    config.training.max_skipped_steps)
    # the divergence policy's settings: Megatron's NaN checks off, its optimizer skips an Inf norm
    assert not args.check_for_nan_in_loss_and_grad and args.grad_norm_skip_threshold == torch.finfo(torch.float32).max


def test_sdpa_attention_on_a_megatron_command_line_needs_the_local_spec(tmp_path, monkeypatch):
    """Megatron-LM's default spec is Transformer Engine's, whose attention is its own: there
    --qad-core-attention sdpa would be ignored, so it is one line naming the flags instead."""
    config = small_config(tmp_path, "model.core_attention=sdpa")
    monkeypatch.setenv("WORLD_SIZE", "1")
    argv = recipe_to_argv(config, tmp_path / "recipe.yaml", use_gpu=False, world_size=1)
    args = parse_megatron_args(argv + ["--transformer-impl", "transformer_engine"])
    with pytest.raises(ConfigError, match="--qad-core-attention sdpa replaces the local spec's attention; .* "
                                          "pass --transformer-impl local"):
        model_config_from_args(args)


def test_a_bad_extra_exit_signal_name_is_one_line_before_the_run_starts(tmp_path, monkeypatch, teacher_dir):
    """On a Megatron-LM command line (a recipe's training.exit_signals are checked with the recipe)."""
    import yaml

    from megatron_qad.config import to_dict
    from megatron_qad.train.megatron import run_pretrain

    config = small_config(tmp_path, teacher=teacher_dir)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    monkeypatch.setenv("WORLD_SIZE", "1")
    argv = recipe_to_argv(config, recipe, use_gpu=False, world_size=1)
    with pytest.raises(ConfigError, match="--qad-extra-exit-signals: 'SIGNOPE' is not a signal name; use e.g. "
                                          "SIGINT,SIGUSR1"):
        run_pretrain(argv + ["--exit-signal-handler", "--qad-extra-exit-signals", "SIGINT,SIGNOPE"])


@pytest.mark.parametrize("created_by", ["initialize", "process_group"])
def test_the_distributed_timeout_reaches_every_process_group(tmp_path, created_by):
    """parallel.distributed_timeout_minutes becomes Megatron's --distributed-timeout-minutes and the
    timeout of the default process group, whether the Megatron door's initialize or the recipe door's
    process_group creates it, and of megatron.core's groups (whose defaults are 10 and 30 minutes):
    a collective waiting for a rank that died or hangs fails after it."""
    from datetime import timedelta

    import torch.distributed as dist
    from megatron.core import parallel_state

    config = small_config(tmp_path, "parallel.distributed_timeout_minutes=3")
    args = parse_megatron_args(recipe_to_argv(config, tmp_path / "recipe.yaml", use_gpu=False, world_size=1))
    assert args.distributed_timeout_minutes == 3 and parallel_config_from_args(args) == config.parallel
    outer = parallel.process_group(timeout_minutes=3) if created_by == "process_group" else contextlib.nullcontext()
    with outer:
        parallel.initialize(config.parallel, backend="gloo")
        try:
            groups = [dist.group.WORLD, parallel_state.get_tensor_model_parallel_group(),
                      parallel_state.get_pipeline_model_parallel_group(),
                      parallel_state.get_data_parallel_group(with_context_parallel=True),
                      parallel_state.get_expert_model_parallel_group()]
            timeouts = {group._get_backend(torch.device("cpu")).options._timeout for group in groups}
        finally:
            parallel.destroy(keep_process_group=created_by == "process_group")
    assert timeouts == {timedelta(minutes=3)}


def test_resume_continues_the_same_loss_curve(tmp_path, teacher_dir):
    """Steps 4..6 after a stop at 3 (training.exit_interval: Megatron saves and exits) and a resume
    (Megatron's --load) equal an uninterrupted run, bit for bit."""
    whole = run(small_config(tmp_path / "a", "training.train_iters=6", teacher=teacher_dir))
    first = run(small_config(tmp_path / "b", "training.train_iters=6", "training.exit_interval=3",
                             teacher=teacher_dir))
    assert first["stopped_at"] == 3 and "final" not in first and first["exit_code"] == 0
    run_dir = tmp_path / "b" / "run"
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert checkpointing.student_checkpoint(run_dir).name == "iter_0000003"
    resumed = run(small_config(tmp_path / "b", "training.train_iters=6", teacher=teacher_dir))
    assert resumed["ptq"] is None  # scales come from the checkpoint, not a new calibration
    assert _losses(first) == _losses(whole)[:3]
    assert _losses(resumed) == _losses(whole)[3:]  # same data, weights, Adam state and LR schedule
    assert resumed["final"] == whole["final"]
    assert (run_dir / "config.yaml").is_file()


def test_a_run_gives_the_exit_signals_their_handlers_back(tmp_path, teacher_dir):
    """Megatron flags SIGTERM (and the package SIGINT and SIGUSR1) during a run; afterwards the
    process's own handlers are back, so a benchmark's next step or an interactive session can be
    stopped and interrupted again."""
    import signal

    exit_signals = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    before = {sig: signal.getsignal(sig) for sig in exit_signals}
    summary = run(small_config(tmp_path, "training.train_iters=2", teacher=teacher_dir))
    assert "final" in summary
    assert {sig: signal.getsignal(sig) for sig in exit_signals} == before


def _learning_rates(stdout: str) -> dict[int, float]:
    """Megatron's logged learning rate per iteration (the LR after that iteration's step)."""
    return {int(match[1]): float(match[2])
            for match in re.finditer(r" iteration +(\d+)/ *\d+ \|.*?\| learning rate: ([-+.0-9E]+) \|", stdout)}


def test_a_resume_with_another_lr_schedule_is_refused_or_applied_by_name(tmp_path, teacher_dir, capsys):
    """A run of 2 iterations (lr_decay_iters null: the cosine decay spans train_iters) resumed with
    train_iters 4: refused by default, one line naming the key (old -> new) and the fix, before
    anything loads; with checkpoint.lr_schedule_on_resume=new, which also changes the LR, min_lr,
    warm-up and decay style (megatron.core keeps max_lr and min_lr in the optimizer's param groups
    too), the optimizer's LR follows the new schedule from iteration 3 on; with =checkpoint the old
    one (decay over 2, the old min_lr) is kept. A train_iters not above the checkpoint's iteration
    is refused by name as well."""
    run(small_config(tmp_path / "a", "training.train_iters=2", teacher=teacher_dir))
    shutil.copytree(tmp_path / "a" / "run", tmp_path / "b" / "run")
    run_dir = tmp_path / "a" / "run"
    capsys.readouterr()

    def cli(*overrides: str) -> tuple[int, str]:
        code = main(["train", str(RECIPE), *SMALL, f"teacher.checkpoint={teacher_dir}", f"checkpoint.save={run_dir}",
                     *overrides])
        return code, capsys.readouterr().err

    code, err = cli("training.train_iters=4")
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"megatron-qad: error: 'checkpoint.save' ({run_dir}) resumes iteration 2, which was saved with another LR "
        f"schedule: training.train_iters 2 -> 4 (training.lr_decay_iters is null: training.train_iters is also the "
        f"number of iterations the LR decays over); set checkpoint.lr_schedule_on_resume=new to apply the new values, "
        f"or =checkpoint to keep the checkpoint's")
    for train_iters in (1, 2):  # 2: the finished run launched again
        code, err = cli(f"training.train_iters={train_iters}")
        assert code == 2 and err.splitlines()[-1] == (
            f"megatron-qad: error: 'training.train_iters' ({train_iters}) is not above iteration 2 of the checkpoint "
            f"in 'checkpoint.save' ({run_dir}): nothing is left to train; set training.train_iters above 2 to train "
            f"further, or start the run in another checkpoint.save")
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "2"

    old = small_config(tmp_path / "a", teacher=teacher_dir).training
    schedule = ["training.train_iters=4", "training.lr=2e-4", "training.min_lr=2e-5", "training.lr_warmup_iters=2",
                "training.lr_decay_style=linear"]
    config = small_config(tmp_path / "a", *schedule, "checkpoint.lr_schedule_on_resume=new", teacher=teacher_dir)
    applied = run(config)
    out = capsys.readouterr().out
    assert (f"'checkpoint.save' ({run_dir}) resumes iteration 2 with the new LR schedule: training.lr 0.0001 -> "
            f"0.0002; training.min_lr 1e-05 -> 2e-05; training.lr_warmup_iters 1 -> 2; training.train_iters 2 -> 4 "
            f"(training.lr_decay_iters" in out)
    assert "training.lr_decay_style cosine -> linear" in out
    assert [line["iteration"] for line in applied["train"]] == [3, 4] and applied["final"]["kl"] > 0
    # Megatron's schedule counts samples: warm-up W = lr_warmup_iters x batch, decay D = decay
    # iterations x batch; after iteration k, linear: lr = min_lr + (lr - min_lr) (1 - (k x batch - W)
    # / (D - W)), and min_lr from D on. The log prints the optimizer's LR, 7 significant digits.
    t = config.training
    warmup, decay = t.lr_warmup_iters * t.global_batch_size, 4 * t.global_batch_size
    linear = t.min_lr + (t.lr - t.min_lr) * (1 - (3 * t.global_batch_size - warmup) / (decay - warmup))
    assert _learning_rates(out) == pytest.approx({3: linear, 4: t.min_lr}, rel=1e-6)
    assert linear == pytest.approx(1.1e-4)

    kept = run(small_config(tmp_path / "b", *schedule, "checkpoint.lr_schedule_on_resume=checkpoint",
                            teacher=teacher_dir))
    out = capsys.readouterr().out
    assert ("resumes iteration 2 with the checkpoint's LR schedule, not the new values: training.lr 0.0001 -> "
            "0.0002" in out)
    assert [line["iteration"] for line in kept["train"]] == [3, 4]
    assert _learning_rates(out) == pytest.approx({3: old.min_lr, 4: old.min_lr}, rel=1e-6)  # the old decay


def test_a_longer_run_whose_lr_schedule_does_not_change_resumes_without_a_setting(tmp_path, teacher_dir, capsys):
    """With lr_decay_iters set (and a constant weight decay) the schedule does not depend on
    train_iters, which Megatron still compares (its weight-decay increment length): a resume with a
    larger train_iters goes on, saying so, and its steps repeat those of a run that was that long."""
    decay = ["training.lr_decay_iters=3"]
    whole = run(small_config(tmp_path / "a", "training.train_iters=4", *decay, teacher=teacher_dir))
    run(small_config(tmp_path / "b", "training.train_iters=2", *decay, teacher=teacher_dir))
    capsys.readouterr()
    resumed = run(small_config(tmp_path / "b", "training.train_iters=4", *decay, teacher=teacher_dir))
    assert (f"'checkpoint.save' ({tmp_path / 'b' / 'run'}) resumes iteration 2 with training.train_iters 2 -> 4, "
            f"which the LR and weight-decay schedule do not depend on") in capsys.readouterr().out
    assert _losses(resumed) == _losses(whole)[2:]


def test_a_tracker_naming_an_incomplete_checkpoint_is_refused_by_name(tmp_path, teacher_dir):
    """Megatron writes latest_checkpointed_iteration.txt only after the iteration's checkpoint is
    complete; a tracker edited to name a partial one is refused before anything loads."""
    run(small_config(tmp_path, "training.train_iters=2", teacher=teacher_dir))
    run_dir = tmp_path / "run"
    (run_dir / "iter_0000004").mkdir()  # a save that died before its tracker update
    assert checkpointing.student_checkpoint(run_dir).name == "iter_0000002"
    (run_dir / "latest_checkpointed_iteration.txt").write_text("4\n")
    with pytest.raises(ConfigError, match="names 'iter_0000004', which is not a complete checkpoint"):
        checkpointing.student_checkpoint(run_dir)


def test_shortened_main_job_lowers_the_kl_by_at_least_30_percent(tmp_path):
    """``make demo`` with 2 layers and 40 QAD iterations: teacher trained from scratch (120
    iterations) on the shipped corpus, PTQ, QAD, all through Megatron's loop (measured with the package's own loop: 77 % lower KL, 15 s; 42 % and 40 % at
    model.seed 1235 and data.seed 7; a 60-iteration teacher, still unsettled, gave 18 %)."""
    config = load_config(RECIPE, [f"teacher.checkpoint={tmp_path / 'teacher'}", f"checkpoint.save={tmp_path / 'qad'}",
                                  "model.num_layers=2", "training.train_iters=40", "training.eval_iters=2"])
    summary = run(config)
    assert summary["ptq"]["kl"] > 0
    assert summary["kl_reduction"] == pytest.approx(1 - summary["final"]["kl"] / summary["ptq"]["kl"])
    assert summary["kl_reduction"] >= 0.30
    assert summary["final"]["teacher ce"] == summary["ptq"]["teacher ce"]  # the teacher did not move


@pytest.mark.parametrize("overrides, message", [
    (["teacher.checkpoint=null"], "'teacher.checkpoint' is not set"),
    (["model.params_dtype=bfloat16"], "needs 'model.params_dtype: float32'"),
    (["training.use_distributed_optimizer=true"], "'training.use_distributed_optimizer: true' needs GPUs"),
    (["data.sources=[{type: nonsense}]"], "data.sources[0]"),
])
def test_run_errors_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as error:
        run(small_config(tmp_path, *overrides))
    assert message in str(error.value)


def test_missing_teacher_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="'teacher.checkpoint' .* does not exist; point it at"):
        run(small_config(tmp_path, "teacher.pretrain_iters=0"))


def _torchrun(processes: int, *args: str) -> dict:
    """``megatron-qad train`` under torchrun on CPU processes; its summary (the record its summary
    line names), with its stdout under "stdout"."""
    stdout = torchrun(processes, "-m", "megatron_qad.cli", "train", str(RECIPE), *args)
    return {**read_summary(stdout), "stdout": stdout}


@pytest.mark.parametrize("layout", [["parallel.pipeline_model_parallel_size=2"],
                                    ["parallel.tensor_model_parallel_size=2"]])
def test_two_process_runs_of_the_tiny_recipe(tmp_path, teacher_dir, layout):
    """The tiny recipe on 2 CPU processes at PP=2 and TP=2 (sequence parallel), from the same
    teacher, against one process. PP changes no arithmetic; TP splits GEMM reductions, which moves
    some calibrated scales by an ulp and NVFP4 values across rounding boundaries (see
    docs/LAYOUTS.md), so its KL agrees to a few percent."""
    args = [*SMALL, f"teacher.checkpoint={teacher_dir}", "training.train_iters=3"]
    one = _torchrun(1, *args, f"checkpoint.save={tmp_path / 'one'}")
    two = _torchrun(2, *args, f"checkpoint.save={tmp_path / 'two'}", *layout)
    # TP=2 against 1 process, relative KL difference measured 2026-11-30 (this recipe, 3 steps,
    # model.seed 1234 / 1235 / 1236, PTQ and final): largest 1.85e-2 (seed 1234, final); 3x that.
    tolerance = 1e-4 if "pipeline" in layout[0] else 6e-2
    for phase in ("ptq", "final"):
        assert two[phase]["kl"] == pytest.approx(one[phase]["kl"], rel=tolerance)
        assert two[phase]["teacher ce"] == pytest.approx(one[phase]["teacher ce"], rel=1e-5)


def test_cli_train_prints_the_config_and_the_summary(tmp_path, teacher_dir):
    """The tiny recipe's quiet console (``logging.console: quiet``): Megatron's argument table, setup
    and memory reports in RUN/megatron.log only; the run ends with the short summary line and the
    lines for a person; the whole record in RUN/summary.json."""
    run_dir = tmp_path / "run"
    summary = _torchrun(1, *SMALL, f"teacher.checkpoint={teacher_dir}", "training.train_iters=1",
                        f"checkpoint.save={run_dir}")
    assert summary["mode"] == "train" and summary["final"]["kl"] > 0
    assert summary["record"] == str(run_dir / "summary.json") and len(summary["train"]) == 1
    saved = (run_dir / "config.yaml").read_text()
    assert "train_iters: 1" in saved and str(teacher_dir) in saved
    assert torch.tensor(summary["final"]["top1 agreement"]) <= 1

    out = summary["stdout"].splitlines()
    assert out[0].startswith(f"config {RECIPE} (overrides: ") and out[0].endswith(f"; resolved in {run_dir / 'config.yaml'}")
    assert any(line.startswith("PTQ calibration: 100 % (1 global batches) in ") for line in out)
    assert any(re.search(r"\biteration +1/ +1 \|", line) for line in out)
    log = (run_dir / "megatron.log").read_text()
    for megatron_line in ("-------------------- end of arguments ---------------------", "memory (MB)",
                          "INFO:megatron.core.optimizer:Setting up optimizer"):
        assert megatron_line in log and not any(megatron_line in line for line in out), megatron_line
    short = [line for line in out if line.startswith("summary {")]
    assert len(short) == 1 and len(short[0]) < 200
    end = out[out.index(short[0]) + 1:]
    assert end[0] == "" and end[1].startswith("trained: 1 iteration, 128 tokens in ")
    assert end[2].split() == ["PTQ", "trained", "change"]
    assert [line.split("  ")[1] for line in end[3:6]] == ["KL(teacher || student)", "student cross entropy",
                                                          "top-1 agreement"]
    assert end[6:8] == [f"student: {run_dir} (Megatron-LM checkpoint, iteration 1)",
                        f"record: {run_dir / 'summary.json'} (every iteration's metrics); Megatron's output: "
                        f"{run_dir / 'megatron.log'}"]
    assert end[8].startswith(f"next: megatron-qad eval {RECIPE} ") and "  # the trained student" in end[8]
    assert end[9].startswith(f"      megatron-qad export {RECIPE} ") and len(end) == 10


def test_eval_reloads_the_trained_student_and_reports_every_layer(tmp_path, teacher_dir):
    """``eval`` on a finished run gives the run's final validation metrics again (the same student
    weights and scales, from its Megatron-LM checkpoint) and a weight error per quantized linear layer."""
    trained = run(small_config(tmp_path, "training.train_iters=2", teacher=teacher_dir))
    evaluated = run(small_config(tmp_path, "training.train_iters=2", teacher=teacher_dir), "eval")
    assert evaluated["student"].endswith("iter_0000002")
    assert evaluated["final"] == trained["final"]
    record = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert record["final"] == trained["final"]
    quantized = [layer for layer in record["layers"] if layer["weight"] == "nvfp4"]
    assert quantized and all(0 < layer["rel_mse"] < 0.05 for layer in quantized)
    assert {layer["kind"] for layer in record["layers"] if layer["weight"] == "bf16"} == {"output_layer"}


def test_eval_without_a_student_checkpoint_is_a_clear_error(tmp_path, teacher_dir):
    with pytest.raises(ConfigError, match="holds no student checkpoint"):
        run(small_config(tmp_path, teacher=teacher_dir), "eval")


def test_the_restored_adam_step_count_is_the_checkpoints_and_per_parameter():
    """megatron.core's distributed optimizer, resumed without TE / Apex, leaves one step tensor in
    every parameter's torch Adam state (and, in its default format, the load template's 0 in it);
    torch then counts it up once per parameter per step. After :func:`restore_step_counts` each
    parameter holds the checkpoint's step in its own tensor and counts one per step."""
    from megatron_qad.train.megatron_fixes import restore_step_counts

    params = [torch.nn.Parameter(torch.ones(3)) for _ in range(3)]
    for fixed in (False, True):
        optimizer = torch.optim.AdamW(params, lr=0.1)
        for param in params:
            param.grad = torch.ones(3)
        optimizer.step()
        shared = torch.tensor(4.0)
        for param in params:
            optimizer.state[param]["step"] = shared
        if fixed:
            shared.zero_()  # the template's step, copied over the loaded one
            restore_step_counts(optimizer, 4)
        optimizer.step()
        counts = [float(optimizer.state[param]["step"]) for param in params]
        assert counts == ([5.0] * 3 if fixed else [7.0] * 3)  # 4 + 3 parameters without the fix


def test_a_loss_spike_stops_the_run_naming_the_checkpoint_taken_before_it(tmp_path, teacher_dir, capsys):
    """Two normal iterations, then a resume at LR 100 with training.max_loss_spike=10: iteration 3
    (the job's first, only checked for finiteness) blows the weights up (Adam moves each by about
    the LR), iteration 4's loss is finite but spikes and stops the run before its step. The line
    names iteration 2 as the last good checkpoint, not the newest one (3), whose finite weights
    are those that diverged (without the bound the run would go on from them)."""
    from torchrun_helpers import read_checkpoints

    save = ["training.train_iters=20", "checkpoint.save_interval=1"]
    run(small_config(tmp_path, *save, "training.exit_interval=2", teacher=teacher_dir))
    stopped = run(small_config(tmp_path, *save, "training.lr=100", "checkpoint.lr_schedule_on_resume=new",
                               "training.max_loss_spike=10", teacher=teacher_dir))
    run_dir = tmp_path / "run"
    assert (stopped["stopped_at"], stopped["exit_code"]) == (4, 17)
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("stopped in iteration")]
    assert re.fullmatch(r"stopped in iteration 4: loss \S+, \S+ times the median \S+ of the last 1 steps \(more than "
                        r"training.max_loss_spike=10, --qad-max-loss-spike\) \(training.on_nonfinite=stop, .*\)\. The "
                        rf"step was not applied, the last good checkpoint is iteration 2 in {re.escape(str(run_dir))}; "
                        r"iteration 3's weights are those that diverged; a diverging run needs a lower learning rate",
                        line), line
    largest = [max(float(tensor.abs().max()) for name, tensor in tensors.items()  # the weights, not Adam's state
                   if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and "optimizer" not in name)
               for tensors, _ in read_checkpoints(run_dir / "iter_0000002", run_dir / "iter_0000003")]
    assert largest[0] < 5 and largest[1] > 50
