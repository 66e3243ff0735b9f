"""A run's checkpoint directory has one writer at a time (``writer.lock``, naming its holder) and
keeps every launch's settings (``launches/``, ``config.yaml``), written only once a run's checks
passed; ``scripts/pretrain_qad.py`` answers a bad flag in one line.

The lock holders are real processes (one that holds a lock, one killed while holding it); the runs
are real megatron.core runs of a 2-layer tiny GPT-MoE (hidden 64) on the CPU."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from distributed_helpers import single_process
from megatron_qad.cli import main
from megatron_qad.config import ConfigError, load_config
from megatron_qad.models import build_model_chunks
from megatron_qad.train import run, writer_lock
from torchrun_helpers import GPT_STYLE_FLAGS, PRETRAIN_QAD, pretrain_qad_command, script_env

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")
SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.moe_ffn_hidden_size=64",
         "model.moe_shared_expert_intermediate_size=64", "model.seq_length=32", "training.eval_iters=1",
         "training.log_interval=1", "distill.calibration_iters=1"]
MEGATRON_FLAGS = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
                  "--num-query-groups", "2", "--seq-length", "32", "--max-position-embeddings", "32",
                  "--vocab-size", "255", "--make-vocab-size-divisible-by", "1", "--micro-batch-size", "2",
                  "--global-batch-size", "8", "--lr", "1e-3", "--train-iters", "2", "--save-interval", "2", "--distributed-backend", "gloo",
                  "--no-save-rng", "--no-load-rng", "--qad-mode", "teacher", *GPT_STYLE_FLAGS]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A dist checkpoint of the SMALL model."""
    from megatron_qad.train import checkpointing

    config = load_config(TINY, SMALL)
    directory = tmp_path_factory.mktemp("directory") / "teacher"
    with single_process():
        checkpointing.save_model(build_model_chunks(config.model, config.parallel, torch.device("cpu")), directory)
    return directory


def _holder(directory: Path) -> subprocess.Popen:
    """A process holding ``directory``'s lock (as a run's rank 0 does) until it is killed."""
    code = ("import sys, time\n"
            "from megatron_qad.train.writer_lock import hold\n"
            "with hold(sys.argv[1], 'checkpoint.save'):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(600)\n")
    process = subprocess.Popen([sys.executable, "-c", code, str(directory)], cwd=ROOT, stdout=subprocess.PIPE,
                               text=True, env=script_env(CUDA_VISIBLE_DEVICES=""))
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_directory_in_use_is_refused_in_one_line_and_a_dead_runs_lock_is_taken_over(tmp_path, capsys):
    """While a live process holds the lock, a run given the directory (here a job of two ranks of
    scripts/pretrain_qad.py with --save) ends on every rank with one line naming the holder, and
    writes nothing;
    once the holder is killed (no release), the next run takes the lock over, saying whose it was,
    and releases it at its end. A lock from another host is held while its heartbeat is recent."""
    save = tmp_path / "run"
    holder = _holder(save)
    lock = save / "writer.lock"
    record = json.loads(lock.read_text())
    try:  # a job of two ranks: rank 0 finds the lock, both end with its line
        second = subprocess.run(pretrain_qad_command(2, *MEGATRON_FLAGS, "--save", str(save)), cwd=ROOT,
                                capture_output=True, text=True, timeout=300, env=script_env(CUDA_VISIBLE_DEVICES=""))
    finally:
        holder.kill()
        holder.wait(timeout=30)
    line = (f"pretrain_qad: error: --save {save} is in use by another run: pid {holder.pid} on {socket.gethostname()}, "
            f"started {record['since']} (lock file {lock}); wait for it to end or give this run another directory (the "
            f"lock of a run that died is taken over: at once on its host, after 10 minutes without its heartbeat from "
            f"another)")
    assert second.returncode != 0 and second.stderr.count(line) == 2, second.stderr[-3000:]  # lines may interleave
    assert [path.name for path in save.iterdir()] == ["writer.lock"]

    with writer_lock.hold(save, "--save"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert capsys.readouterr().out == (f"--save {save}: taking over the lock of a run that ended without releasing it "
                                       f"(pid {holder.pid} on {socket.gethostname()}, started {record['since']})\n")
    assert not lock.exists()

    lock.write_text(json.dumps({**record, "host": "elsewhere"}))  # a run on another node, its heartbeat now
    with pytest.raises(ConfigError, match=rf"^'checkpoint.save' \({save}\) is in use by another run: pid {holder.pid} "
                                          rf"on elsewhere"):
        with writer_lock.hold(save, "checkpoint.save"):
            pass
    silent = time.time() - writer_lock.STALE_AFTER_S - 60
    os.utime(lock, (silent, silent))
    with writer_lock.hold(save, "checkpoint.save"):
        pass
    assert f"taking over the lock of a run that ended without releasing it (pid {holder.pid} on elsewhere" in \
        capsys.readouterr().out
    assert not lock.exists()


def test_a_refused_run_leaves_the_settings_and_every_launch_keeps_its_own(tmp_path, teacher_dir, capsys):
    """A resume refused by its checks (another LR schedule before anything is built, a data file
    that is not JSON once the model and checkpoint are loaded) rewrites neither config.yaml nor
    the launch records; each launch that runs adds its settings file, naming the iteration it started
    from, and config.yaml is the latest one's recipe."""
    save = tmp_path / "run"
    recipe = [*SMALL, f"teacher.checkpoint={teacher_dir}", f"checkpoint.save={save}"]
    run(load_config(TINY, [*recipe, "training.train_iters=1"]))
    first = (save / "config.yaml").read_bytes()
    capsys.readouterr()
    assert main(["train", TINY, *recipe, "training.train_iters=2"]) == 2
    assert "which was saved with another LR schedule" in capsys.readouterr().err
    assert (save / "config.yaml").read_bytes() == first
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "cut short\n')  # refused once Megatron has built the model and loaded the run
    assert main(["train", TINY, *recipe, "training.train_iters=2", "checkpoint.lr_schedule_on_resume=new",
                 f"data.sources=[{{type: jsonl, paths: ['{bad}']}}]"]) == 2
    assert f"{bad}:1 is not valid JSON" in capsys.readouterr().err
    assert (save / "config.yaml").read_bytes() == first
    assert sorted(path.name for path in (save / "launches").iterdir()) == ["0001.yaml"]

    run(load_config(TINY, [*recipe, "training.train_iters=2", "checkpoint.lr_schedule_on_resume=new"]))
    launches = [yaml.safe_load((save / "launches" / name).read_text()) for name in ("0001.yaml", "0002.yaml")]
    assert [launch["start_iteration"] for launch in launches] == [0, 1]
    assert [launch["recipe"]["training"]["train_iters"] for launch in launches] == [1, 2]
    assert [launch["command"] for launch in launches] == ["train", "train"]
    assert yaml.safe_load((save / "config.yaml").read_text()) == launches[1]["recipe"]
    assert "--train-iters" in launches[1]["argv"]
    assert not (save / "writer.lock").exists()


def test_an_unknown_flag_prints_one_line():
    """Megatron's parser would print its usage (about 730 lines) before the error."""
    result = subprocess.run([sys.executable, str(PRETRAIN_QAD), "--no-such-flag", "1"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=script_env(CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == 2
    assert result.stderr == ("pretrain_qad.py: error: unrecognized arguments: --no-such-flag 1 (pretrain_qad.py "
                             "--help lists the flags)\n")
