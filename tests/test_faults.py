"""Faults of the input a run is given end in one line naming the file or the recipe key, never in a
traceback: a cut teacher shard, a teacher of another architecture, an existing but empty teacher
directory, an export directory under a regular file, a malformed JSON-lines record, and Ctrl-C.

The checkpoints are real megatron.core dist checkpoints of a 2-layer tiny GPT-MoE (hidden 64),
written once per module by ``checkpointing.save_model``."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distributed_helpers import single_process
from megatron_qad.cli import main
from megatron_qad.config import ConfigError, load_config
from megatron_qad.models import build_model_chunks
from megatron_qad.train import teacher_state
from torchrun_helpers import script_env

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")
SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.moe_ffn_hidden_size=64",
         "model.moe_shared_expert_intermediate_size=64", "model.seq_length=32"]


def chunks_of(*overrides):
    config = load_config(TINY, [*SMALL, *overrides])
    return build_model_chunks(config.model, config.parallel, torch.device("cpu"))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A dist checkpoint of the SMALL model (what ``teacher.pretrain_iters`` would leave)."""
    from megatron_qad.train import checkpointing

    directory = tmp_path_factory.mktemp("faults") / "teacher"
    with single_process():
        checkpointing.save_model(chunks_of(), directory)
    return directory


def copy_of(directory: Path, tmp_path: Path) -> Path:
    copy = tmp_path / directory.name
    shutil.copytree(directory, copy)
    return copy


def test_a_cut_teacher_shard_names_the_file(teacher_dir, tmp_path):
    from megatron_qad.train import checkpointing
    from megatron_qad.train.preflight import check_teacher_checkpoint

    damaged = copy_of(teacher_dir, tmp_path)
    shard = damaged / "__0_0.distcp"
    size = shard.stat().st_size
    with open(shard, "r+b") as handle:
        handle.truncate(size // 2)
    expected = f"checkpoint '{damaged}' is damaged: {shard} has {size // 2} bytes but its index needs {size}"
    config = load_config(TINY, [*SMALL, f"teacher.checkpoint={damaged}"])
    with pytest.raises(ConfigError, match="^" + expected.replace(".", r"\.")):
        check_teacher_checkpoint(config)  # before any model is built
    with single_process(), pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        checkpointing.load_model(chunks_of(), damaged)  # today an EOFError in torch's unpickler
    (damaged / ".metadata").write_bytes((damaged / ".metadata").read_bytes()[:100])
    with pytest.raises(ConfigError, match=r"is damaged: its index .*\.metadata cannot be read"):
        check_teacher_checkpoint(config)


@pytest.mark.parametrize("overrides, expected", [
    (["model.hidden_size=128"], "model.hidden_size gives 128 here but 64 in the checkpoint (e.g. 'embedding."
                                "word_embeddings.weight' is [1024, 64] in the checkpoint and [1024, 128] here)"),
    (["model.num_layers=4"], "model.num_layers gives 4 here but 2 in the checkpoint"),
    (["model.vocab_size=512", "model.moe_ffn_hidden_size=32"],
     "model.vocab_size gives 512 here but 1024 in the checkpoint; model.moe_ffn_hidden_size gives 32 here but 64"),
    (["model.num_moe_experts=0"], "holds another architecture than the recipe's model: it has no tensor "
                                  "'decoder.layers.mlp.linear_fc2.weight'"),
])
def test_a_teacher_of_another_architecture_names_the_recipe_keys(teacher_dir, overrides, expected):
    from megatron_qad.train import checkpointing

    with single_process(), pytest.raises(ConfigError) as info:
        checkpointing.load_model(chunks_of(*overrides), teacher_dir)
    assert expected in str(info.value) and str(teacher_dir) in str(info.value)
    if "num_moe_experts" in overrides[0]:
        assert "set model.num_moe_experts" in str(info.value)


def test_the_teacher_checkpoint_is_trained_only_where_no_directory_exists(teacher_dir, tmp_path):
    from megatron_qad.train.preflight import check_teacher_checkpoint

    def check(path, pretrain_iters=100):
        config = load_config(TINY, [*SMALL, f"teacher.checkpoint={path}", f"teacher.pretrain_iters={pretrain_iters}"])
        return check_teacher_checkpoint(config)

    assert check(teacher_dir) is False  # a complete checkpoint is loaded, never trained over
    assert check(tmp_path / "new" / "teacher") is True
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^'teacher.checkpoint' \(.*empty\) is empty: it is not a checkpoint\. "
                                          r"Point it at one, or remove the directory"):
        check(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"\(.*other\) holds neither latest_checkpointed_iteration.txt nor metadata.json"):
        check(tmp_path / "other")
    with pytest.raises(ConfigError, match=r"does not exist; point it at the teacher's dist checkpoint, or set "
                                          r"teacher.pretrain_iters > 0"):
        check(tmp_path / "missing", pretrain_iters=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"is a file, not a dist checkpoint directory"):
        check(tmp_path / "file")
    with pytest.raises(ConfigError, match=rf"^'teacher.checkpoint' \({tmp_path / 'file' / 'teacher'}\) lies under "
                                          rf"{tmp_path / 'file'}, which is a regular file"):
        check(tmp_path / "file" / "teacher")
    with pytest.raises(ConfigError, match="'teacher.checkpoint' is not set"):
        check_teacher_checkpoint(load_config(TINY, [*SMALL, "teacher.checkpoint=null"]))


def test_an_export_dir_under_a_regular_file_exits_2_before_loading(teacher_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(teacher_dir, run / "ptq")  # a model checkpoint where export looks for the student
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "hf"
    assert main(["export", TINY, *SMALL, f"checkpoint.save={run}", f"export.dir={out}"]) == 2
    captured = capsys.readouterr()
    assert captured.err == (f"megatron-qad: error: 'export.dir' ({out}) lies under {tmp_path / 'file'}, which is "
                            f"a regular file, not a directory; choose another export.dir\n")
    assert captured.out == ""


def test_a_malformed_jsonl_line_exits_2_naming_the_file_and_line(teacher_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "one document"}\n{"text": "cut short\n{"text": "three"}\n')
    code = main(["train", TINY, *SMALL, f"teacher.checkpoint={teacher_dir}", f"checkpoint.save={tmp_path / 'run'}",
                 f"data.sources=[{{type: jsonl, paths: ['{data}']}}]", "training.train_iters=1"])
    err = capsys.readouterr().err
    assert code == 2  # the data is read inside Megatron's loop, after its own start-up notices
    assert err.strip().splitlines()[-1].startswith(
        f"megatron-qad: error: 'data.sources[0].paths': {data}:2 is not valid JSON (")
    assert "Traceback" not in err


def test_a_checkpoint_save_under_a_regular_file_exits_2_before_loading(teacher_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    save = tmp_path / "file" / "run"
    assert main(["train", TINY, *SMALL, f"teacher.checkpoint={teacher_dir}", f"checkpoint.save={save}"]) == 2
    assert capsys.readouterr().err == (f"megatron-qad: error: 'checkpoint.save' ({save}) lies under "
                                       f"{tmp_path / 'file'}, which is a regular file, not a directory; choose "
                                       f"another checkpoint.save\n")


def test_a_save_on_a_full_disk_names_the_cause_and_the_last_good_checkpoint(teacher_dir, tmp_path, capsys):
    """The save of iteration 2 writes its shard into /dev/full (a symlink put where the shard goes),
    whose every write fails with ENOSPC as on a full file system: one line names the file, the cause
    and iteration 1, which Megatron's tracker still names."""
    save = tmp_path / "run"
    (save / "iter_0000002").mkdir(parents=True)
    shard = save / "iter_0000002" / "__0_0.distcp"
    shard.symlink_to("/dev/full")
    code = main(["train", TINY, *SMALL, f"teacher.checkpoint={teacher_dir}", f"checkpoint.save={save}",
                 "data.sources=[{type: random}]", "training.train_iters=2", "checkpoint.save_interval=1",
                 "training.global_batch_size=4", "training.micro_batch_size=2", "training.eval_iters=1",
                 "distill.calibration_iters=1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"megatron-qad: error: saving the checkpoint of iteration 2 into {save} failed: No space left on device "
        f"(ENOSPC) writing {shard}; the last good checkpoint is iteration 1 in {save}; free space there (or set "
        f"checkpoint.save / --save to a file system with room), then the same command resumes from it")
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "1"


def test_tiny_data_repeated_by_the_run_exits_2_before_training(teacher_dir, tmp_path, capsys):
    """Two 10-byte files: one training window of 11 tokens, which 100 iterations of 8 samples would
    read 800 times; one line says so first."""
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(name * 2)  # 10 bytes
    code = main(["train", TINY, *SMALL, f"teacher.checkpoint={teacher_dir}", f"checkpoint.save={tmp_path / 'run'}",
                 f"data.sources=[{{type: text, paths: ['{tmp_path}/*.txt']}}]"])
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err
    assert ("data: the train split reads its 1 distinct samples 800 times each (800 samples); the validation split "
            "reads its 1 distinct samples ") in captured.out
    assert captured.err.splitlines()[-1] == (
        "megatron-qad: error: 'data.sources': the train split has 1 distinct samples and the run reads 800 "
        "(training.train_iters x training.global_batch_size): each 800 times, more than data.max_repeats=100; add "
        "data, lower training.train_iters, or raise data.max_repeats (null: no bound)")


def test_ctrl_c_prints_interrupted_and_exits_130(tmp_path):
    """SIGINT right after the recipe is printed (the run is still starting: Megatron's loop, whose
    signal handler turns SIGINT into a save and a clean exit, has not begun)."""
    command = [sys.executable, "-m", "megatron_qad.cli", "train", TINY, *SMALL,
               f"teacher.checkpoint={tmp_path / 'teacher'}", f"checkpoint.save={tmp_path / 'run'}"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=script_env(CUDA_VISIBLE_DEVICES=""))
    try:
        assert process.stdout.readline().startswith("config ")
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] == "megatron-qad: interrupted"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_ctrl_c_during_training_saves_and_exits_cleanly(tmp_path, teacher_dir, capsys):
    """SIGINT once Megatron's loop runs (here the teacher's training): the step finishes, a
    checkpoint is saved, one line says where, exit 0, and the run's directories are unlocked. While
    it trains, a second run given its checkpoint.save is refused in one line and writes nothing
    there. The same command then resumes the teacher to teacher.pretrain_iters before distilling
    from it, never from the half-trained one."""
    teacher, save = tmp_path / "teacher", tmp_path / "run"
    command = [sys.executable, "-m", "megatron_qad.cli", "train", TINY, *SMALL, "teacher.pretrain_iters=8",
               "training.log_interval=1", "training.train_iters=1", "distill.calibration_iters=1",
               f"teacher.checkpoint={teacher}", f"checkpoint.save={save}"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=script_env(CUDA_VISIBLE_DEVICES=""))
    lines, sent = [], False
    try:
        for line in process.stdout:  # to the end of the output
            lines.append(line)
            if " iteration        2/" in line and not sent:
                process.send_signal(signal.SIGSTOP)  # a second run starts while this one is mid-training
                before = {path.name: path.read_bytes() for path in save.iterdir()}
                code = main(["train", TINY, *SMALL, f"teacher.checkpoint={teacher_dir}", f"checkpoint.save={save}",
                             "data.seed=7"])
                assert {path.name: path.read_bytes() for path in save.iterdir()} == before
                process.send_signal(signal.SIGCONT)
                process.send_signal(signal.SIGINT)
                sent = True
        process.wait(timeout=120)
    finally:
        process.kill()
    out = "".join(lines)
    assert sent and process.returncode == 0, out[-3000:]
    assert code == 2 and capsys.readouterr().err.splitlines()[-1].startswith(
        f"megatron-qad: error: 'checkpoint.save' ({save}) is in use by another run: pid {process.pid} on ")
    assert "stopped after iteration" in out and "resume with the same command" in out
    tracker = teacher / "latest_checkpointed_iteration.txt"
    stopped = int(tracker.read_text())
    assert 2 <= stopped < 8  # a teacher of 8 iterations, stopped early
    assert (f"the teacher's training stopped at iteration {stopped} of 8; {teacher} is marked unfinished: the "
            f"same command resumes its training") in out
    assert "delete that directory" not in out
    assert not (teacher / "writer.lock").exists() and not (save / "writer.lock").exists()
    with pytest.raises(ConfigError, match=rf"^--qad-teacher-load {teacher} is a teacher whose training stopped at "
                                          rf"iteration {stopped} of 8: no run distils from a half-trained teacher"):
        teacher_state.check_finished(teacher, f"--qad-teacher-load {teacher}")  # scripts/pretrain_qad.py's check

    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env=script_env(CUDA_VISIBLE_DEVICES=""))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    iterations = re.findall(r" iteration +(\d+)/ +8 \|", resumed.stdout)
    assert iterations == [str(i) for i in range(stopped + 1, 9)]  # the teacher went on where it stopped
    assert int(tracker.read_text()) == 8
    assert json.loads((teacher / "qad_teacher.json").read_text())["status"] == "finished"
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "1"  # then distilled from it
