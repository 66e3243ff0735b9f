"""What a run tells a person: progress lines, the quiet console, the end-of-run summary."""

import argparse
import re
from pathlib import Path

from megatron_qad.progress import Progress, duration
from megatron_qad.train.console import megatron_output, rank_log
from megatron_qad.train.summary import human_lines, next_lines, record_path, short_line

PROGRESS = re.compile(r"work: (\d+) % \((\d+)/200 items\), [\d,]+ tokens/s, ETA \d.*s$")


def test_progress_prints_one_line_per_tenth_and_a_last_one(capsys):
    progress = Progress("work", 200, unit="items")
    for _ in range(200):
        progress.advance(1, tokens=3)
    *lines, last = capsys.readouterr().out.splitlines()
    assert [PROGRESS.match(line).groups() for line in lines] == [(str(p), str(2 * p)) for p in range(10, 100, 10)]
    assert re.fullmatch(r"work: 100 % \(200 items\) in \d.* s, [\d,]+ tokens/s", last)
    Progress("nothing", 0).advance(5)
    big = Progress("jumps", 10)
    big.advance(7)
    big.advance(3)
    out = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0].split(" in ")[0] for line in out] == ["jumps: 70 % (7/10 tokens)", "jumps: 100 % (10 tokens)"]


def test_durations_read_as_a_person_says_them():
    assert [duration(s) for s in (0.44, 12.3, 185, 7620)] == ["0.4 s", "12 s", "3 min 05 s", "2 h 07 min"]


def test_quiet_console_keeps_megatron_output_in_the_run_log(tmp_path, capsys, monkeypatch):
    """Megatron's argument table and other lines go to the log only; its iteration, validation and
    error lines and the package's own lines (here a progress line) reach the console too."""
    from megatron.training.arguments import _print_args
    from megatron.training.utils import print_rank_0

    iteration = " [2026-12-01 10:00:00] iteration        1/      10 | consumed samples: 8 | loss: 1.0E+00 |"
    log = tmp_path / "run" / "megatron.log"
    with megatron_output(log):
        _print_args("arguments", argparse.Namespace(lr=0.1))
        print_rank_0("> building train, validation, and test datasets ...")
        print_rank_0(iteration)
        print_rank_0(" validation loss at iteration 10 | loss value: 1.0")
        Progress("PTQ calibration", 1, unit="global batches").advance(1)
        print_rank_0("ValueError: something Megatron reports")
    shown = capsys.readouterr().out.splitlines()
    assert shown[:2] == [iteration, " validation loss at iteration 10 | loss value: 1.0"]
    assert shown[2].startswith("PTQ calibration: 100 % (1 global batches) in ")
    assert shown[3:] == ["ValueError: something Megatron reports"]
    logged = log.read_text().splitlines()
    assert logged[:3] == ["------------------------ arguments ------------------------", "  lr " + "." * 46 + " 0.1",
                          "-------------------- end of arguments ---------------------"]
    assert logged[3] == "> building train, validation, and test datasets ..." and logged[4:] == shown
    with megatron_output(None):
        print_rank_0("full console")
    assert capsys.readouterr().out == "full console\n"
    monkeypatch.setenv("RANK", "3")
    assert rank_log(log) == tmp_path / "run" / "megatron.rank3.log"


SUMMARY = {"mode": "train", "seconds": 72.4, "tokens": 51200, "kl_reduction": 0.5943,
           "ptq": {"kl": 7.912e-4, "student ce": 2.9340, "top1 agreement": 0.9681},
           "final": {"kl": 3.210e-4, "student ce": 2.9331, "top1 agreement": 0.9790},
           "train": [{"iteration": i + 1, "loss": 1e-3} for i in range(100)],
           "checkpoint": {"dir": "runs/tiny_cpu/qad", "iteration": 100},
           "record": "runs/tiny_cpu/qad/summary.json", "log": "runs/tiny_cpu/qad/megatron.log"}


def test_the_end_of_a_run_reads_as_a_few_lines_and_one_short_json_line():
    assert human_lines(SUMMARY) == [
        "trained: 100 iterations, 51,200 tokens in 1 min 12 s",
        "                          PTQ         trained     change",
        "  KL(teacher || student)  7.912e-04   3.210e-04   -59.4 %",
        "  student cross entropy   2.9340      2.9331      -0.0 %",
        "  top-1 agreement         96.81%      97.90%      +1.1 %",
        "student: runs/tiny_cpu/qad (Megatron-LM checkpoint, iteration 100)",
        "record: runs/tiny_cpu/qad/summary.json (every iteration's metrics); "
        "Megatron's output: runs/tiny_cpu/qad/megatron.log"]
    assert short_line(SUMMARY) == ('summary {"kl_reduction": 0.5943, "mode": "train", '
                                   '"record": "runs/tiny_cpu/qad/summary.json", "seconds": 72.4}')
    stopped = {"mode": "train", "seconds": 5.0, "tokens": 1024, "stopped_at": 2, "exit_code": 0,
               "ptq": SUMMARY["ptq"], "train": SUMMARY["train"][:2]}
    assert human_lines(stopped)[0] == "trained: 2 iterations, 1,024 tokens in 5.0 s, stopped at iteration 2 (exit code 0)"
    assert human_lines(stopped)[1].split() == ["PTQ"] and len(human_lines(stopped)) == 5
    evaluated = {"mode": "eval", "seconds": 12.0, "tokens": 0, "ptq": None, "final": SUMMARY["final"], "train": [],
                 "checkpoint": {"dir": "runs/tiny_cpu/qad/iter_0000100"}}
    assert human_lines(evaluated) == ["evaluation of the student in 12 s",
                                      "                          student",
                                      "  KL(teacher || student)  3.210e-04",
                                      "  student cross entropy   2.9331",
                                      "  top-1 agreement         97.90%",
                                      "student: runs/tiny_cpu/qad/iter_0000100 (dist checkpoint)"]
    assert next_lines("train", lambda command: f"megatron-qad {command} configs/tiny_cpu.yaml") == [
        "next: megatron-qad eval configs/tiny_cpu.yaml    # the trained student against the teacher, with every "
        "layer's weight error",
        "      megatron-qad export configs/tiny_cpu.yaml  # the NVFP4 Hugging Face checkpoint"]


def test_the_record_goes_next_to_the_checkpoints():
    args = argparse.Namespace(qad_summary=None, qad_mode="qad", qad_eval_report=None, save="runs/x",
                              qad_command="train")
    assert record_path(args) == "runs/x/summary.json"
    assert record_path(argparse.Namespace(**{**vars(args), "qad_command": "ptq"})) == "runs/x/ptq_summary.json"
    assert record_path(argparse.Namespace(**{**vars(args), "qad_eval_report": "runs/x/eval.json"})) == "runs/x/eval.json"
    assert record_path(argparse.Namespace(**{**vars(args), "qad_mode": "teacher"})) is None
    assert record_path(argparse.Namespace(**{**vars(args), "save": None})) is None
    assert record_path(argparse.Namespace(**{**vars(args), "qad_summary": "a.json", "save": None})) == "a.json"


def test_the_recipe_key_compiles_to_the_console_flags(tmp_path):
    """``logging.console: quiet`` (the tiny recipe's) -> ``--qad-console quiet --qad-log RUN/megatron.log``,
    for the teacher's run too; without ``checkpoint.save`` the console stays full."""
    from megatron_qad.config import load_config
    from megatron_qad.train.arguments import recipe_to_argv

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
    config = load_config(tiny, [f"checkpoint.save={tmp_path / 'run'}"])
    for mode in ("qad", "teacher"):
        argv = recipe_to_argv(config, "r.yaml", mode=mode, use_gpu=False, world_size=1)
        index = argv.index("--qad-console")
        assert argv[index:index + 4] == ["--qad-console", "quiet", "--qad-log", str(tmp_path / "run" / "megatron.log")]
    for overrides in (["checkpoint.save=null"], ["logging.console=full"]):
        argv = recipe_to_argv(load_config(tiny, overrides), "r.yaml", use_gpu=False, world_size=1)
        assert "--qad-console" not in argv and "--qad-log" not in argv
