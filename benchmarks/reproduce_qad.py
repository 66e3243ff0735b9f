"""QAT forgets, QAD recovers: task accuracy and KL of NVFP4 students of a post-trained teacher.

    python benchmarks/reproduce_qad.py [--recipe configs/reproduce_task.yaml] [--out runs/reproduce_task]
        [--teacher-seeds 1] [--min-teacher-accuracy 0.95] [--variants all | NAME,NAME,...] [--seeds 1,2,3]
        [--qad-lrs 1e-5,3e-5] [--qat-lrs 1e-5,3e-5] [--jobs 1] [--problems 500] [--eval-windows 32]
        [--generated-sequences 512] [--answer-prompts 16384] [--results docs/RESULTS.md] [key.path=value ...]

The teacher is trained here in stages (``megatron_qad.train.teacher_stages``): pre-training on the
recipe's general text (``data.sources``), SFT on a task with checkable answers whose labels are
partly wrong (the ``arithmetic`` source in ``teacher.posttrain_sources``: the SFT data), and
rejection-sampling fine-tuning on its own correct answers (``teacher.rft_sources``), which moves it
beyond its SFT data as RL moves a released model. Each of ``--teacher-seeds`` (model
initialisation, data order and sampling) gets its own teacher in ``OUT/teacher<SEED>``; the
students start from the first one. The teachers and their SFT stages are evaluated like the
students (the teacher row of the students' table is the first teacher). Every teacher must reach ``--min-teacher-accuracy`` held-out
exact match: otherwise the benchmark stops with one line saying so and writes no table. The
trained students run ``training.train_iters`` steps of ``training.global_batch_size`` sequences,
so all see the same number of tokens:

  PTQ, PTQ 4/6                  calibration only (NVFP4, Four Over Six)
  QAT (SFT data)                cross entropy on the SFT data's labels (the "original training data")
  QAD (SFT data)                KL(teacher || student) on the SFT data
  QAD 4/6 (SFT data)            the same with Four Over Six blocks
  QAD (teacher answers)         the KL on the teacher's sampled answers to the task's training prompts
  QAT (general text)            cross entropy on the general text
  QAD (general text)            the KL on the general text
  QAD (random tokens)           the KL on uniform random token ids
  QAD (teacher-generated)       the KL on text sampled from the teacher (from BOS, temperature 1)

Each model is evaluated on the task's held-out problems (greedy decoding after the task's
``prompt_context`` solved problems and the prompt, exact match of the correct answer after "="),
separately on the held-out problems whose SFT label would be wrong (where a model that follows the
labels fails), and against the teacher on held-out task text and general text (KL, CE). Students
run once per ``--seeds`` entry (data order and calibration batches); the table gives mean ± sample
standard deviation. QAT and QAD on the SFT data (when among
``--variants``) also run at the learning rates of ``--qat-lrs`` / ``--qad-lrs`` (first seed only)
for the LR sweep table.

``--jobs N`` runs the teachers, then the students, in N processes at once (one GPU holds them all:
the model is small), ``--jobs 1`` in this process. A run whose record (``metrics.json``) exists is
not repeated, so an interrupted benchmark continues and more seeds or LRs can be added later. With
``--results FILE`` the tables go into FILE between the markers ``<!-- reproduce_qad: begin -->``
and ``<!-- reproduce_qad: end -->`` (the whole file when it has none).
"""

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import result_benchmarks  # noqa: E402
from result_benchmarks import (collect, executor, number_list, run_label, slug, variant_names,  # noqa: E402
                               write_between_markers)

from megatron_qad.config import ConfigError, QADConfig, load_config  # noqa: E402
from megatron_qad.data.sources import with_defaults  # noqa: E402
from megatron_qad.evaluate.students import evaluate_model, evaluation_data  # noqa: E402
from megatron_qad.train import checkpointing, run  # noqa: E402
from megatron_qad.train.arguments import write_summary  # noqa: E402
from megatron_qad.train.teacher_stages import prepare_teacher, rft_dirs  # noqa: E402

TEACHER = "BF16 teacher"
SFT_STAGE = "SFT stage of the teacher"
QAT_SFT, QAD_SFT = "QAT (SFT data)", "QAD (SFT data)"
VARIANTS = {
    # name: (run mode, recipe overrides, training data: see training_sources)
    "PTQ": ("ptq", [], "general"),
    "PTQ 4/6": ("ptq", ["quantization.format=nvfp4_4over6"], "general"),
    QAT_SFT: ("train", ["distill.loss=ce"], "sft"),
    QAD_SFT: ("train", ["distill.loss=kl"], "sft"),
    "QAD 4/6 (SFT data)": ("train", ["distill.loss=kl", "quantization.format=nvfp4_4over6"], "sft"),
    "QAD (teacher answers)": ("train", ["distill.loss=kl"], "answers"),
    "QAT (general text)": ("train", ["distill.loss=ce"], "general"),
    "QAD (general text)": ("train", ["distill.loss=kl"], "general"),
    "QAD (random tokens)": ("train", ["distill.loss=kl"], "random"),
    "QAD (teacher-generated)": ("train", ["distill.loss=kl"], "generated"),
}
GENERATION_BATCH = 64
"""Sequences the teacher extends per forward pass when generating the teacher-generated data."""
ANSWER_BATCH = 1024
"""Prompts the teacher answers per forward pass for the teacher-answers data."""
BEGIN, END = "<!-- reproduce_qad: begin -->", "<!-- reproduce_qad: end -->"
COLUMNS = (("accuracy", "task accuracy"), ("mislabelled accuracy", "accuracy, mislabelled problems"),
           ("task kl", "KL, task text"), ("general kl", "KL, general text"),
           ("task student ce", "CE, task text"), ("general student ce", "CE, general text"))


def teacher_dir(args, teacher_seed: int) -> Path:
    """Where teacher seed ``teacher_seed`` keeps its teacher, its stages and its students."""
    return args.out / f"teacher{teacher_seed}"


def base_config(args) -> QADConfig:
    """The recipe with the command line's overrides, its teacher the first teacher seed's."""
    checkpoint = teacher_dir(args, args.teacher_seeds[0]) / "teacher"
    return load_config(args.recipe, [*args.overrides, f"teacher.checkpoint={checkpoint}"])


def teacher_config(args, teacher_seed: int) -> QADConfig:
    """The recipe for teacher seed ``teacher_seed``: its directory, model seed and data seed."""
    checkpoint = teacher_dir(args, teacher_seed) / "teacher"
    return load_config(args.recipe, [*args.overrides, f"teacher.checkpoint={checkpoint}",
                                     f"model.seed={teacher_seed}", f"data.seed={teacher_seed}"])


def task_source(config: QADConfig) -> dict:
    """The ``arithmetic`` source of the recipe's SFT data (what accuracy is measured on)."""
    for spec in config.teacher.posttrain_sources or []:
        if isinstance(spec, dict) and spec.get("type") == "arithmetic":
            return spec
    raise ConfigError(f"'teacher.posttrain_sources' of {config.teacher.posttrain_sources!r} has no "
                      f"{{type: arithmetic}} source: the benchmark measures task accuracy on it; add one")


def training_sources(kind: str, config: QADConfig, seed: int, args) -> list[dict]:
    """The ``data.sources`` of a student trained on ``kind`` data at data seed ``seed``."""
    cache = teacher_dir(args, args.teacher_seeds[0]) / "generated"
    if kind == "sft":
        return copy.deepcopy(config.teacher.posttrain_sources)
    if kind == "answers":
        task = {key: value for key, value in task_source(config).items() if key != "weight"}
        return [{"type": "teacher_answers", "task": task, "num_prompts": args.answer_prompts, "keep": "all",
                 "batch_size": ANSWER_BATCH, "cache": str(cache / f"answers_seed{seed}.pt")}]
    if kind == "generated":
        return [{"type": "teacher_generated", "num_sequences": args.generated_sequences,
                 "batch_size": GENERATION_BATCH, "cache": str(cache / f"sequences_seed{seed}.pt")}]
    if kind == "random":
        return [{"type": "random"}]
    return copy.deepcopy(config.data.sources)


def record_of(path: Path, measure) -> dict:
    """The record at ``path``; made by ``measure()`` and written there (atomically) when missing."""
    if path.is_file():
        return json.loads(path.read_text())
    result = measure()
    write_summary(path, result)
    print(json.dumps(result), flush=True)
    return result


def metrics_row(metrics: dict) -> dict:
    """An evaluation's metrics (:func:`evaluate_model`) as the flat keys of a record."""
    return {"accuracy": metrics["accuracy"], "mislabelled accuracy": metrics["mislabelled accuracy"],
            **{f"{split} {key}": value for split in ("task", "general") for key, value in metrics[split].items()}}


def train_teacher(args, data, teacher_seed: int) -> list[dict]:
    """Train teacher seed ``teacher_seed`` (unless done before) and evaluate it and its SFT stage."""
    config = teacher_config(args, teacher_seed)
    directory = teacher_dir(args, teacher_seed)

    def measure_teacher():
        start = time.perf_counter()
        prepare_teacher(config)
        seconds = time.perf_counter() - start
        return {"variant": TEACHER, "teacher seed": teacher_seed, "seed": teacher_seed, "lr": None,
                "run seconds": round(seconds, 1), **metrics_row(evaluate_model(config, None, False, data)),
                "seconds": round(time.perf_counter() - start, 1)}

    rows = [record_of(directory / "teacher.json", measure_teacher)]
    if config.teacher.rft_iters:
        def measure_sft_stage():
            start = time.perf_counter()
            metrics = evaluate_model(config, rft_dirs(config)[0], False, data)
            return {"variant": SFT_STAGE, "teacher seed": teacher_seed, "seed": teacher_seed, "lr": None,
                    "run seconds": 0.0, **metrics_row(metrics), "seconds": round(time.perf_counter() - start, 1)}
        rows.append(record_of(directory / "sft_stage.json", measure_sft_stage))
    return rows


def run_student(args, data, name: str, seed: int, lr: float | None) -> dict:
    """Train / calibrate one student of the first teacher (unless done before) and evaluate it."""
    mode, overrides, kind = VARIANTS[name]
    directory = (teacher_dir(args, args.teacher_seeds[0]) / slug(name) / f"seed{seed}"
                 / (f"lr{lr:g}" if lr is not None else "recipe_lr"))
    base = base_config(args)
    lrs = [f"training.lr={lr}", f"training.min_lr={lr / 10}"] if lr is not None else []
    config = load_config(args.recipe, [*args.overrides, f"teacher.checkpoint={base.teacher.checkpoint}", *overrides,
                                       f"data.seed={seed}", *lrs])
    config.data.sources = training_sources(kind, base, seed, args)
    config.data.validation_sources = config.data.validation_sources or base.data.sources
    config.checkpoint.save, config.checkpoint.resume = str(directory), False

    def measure():
        start = time.perf_counter()
        summary = run(config, mode)
        metrics = evaluate_model(config, checkpointing.student_checkpoint(directory), True, data)
        return {"variant": name, "seed": seed, "lr": config.training.lr if mode == "train" else None,
                "run seconds": summary["seconds"], **metrics_row(metrics),
                "seconds": round(time.perf_counter() - start, 1)}

    return record_of(directory / "metrics.json", measure)


def check_teachers(rows: list[dict], minimum: float) -> None:
    """SystemExit with one line when a teacher's held-out accuracy is below ``minimum``."""
    weak = [row for row in rows if row["variant"] == TEACHER and row["accuracy"] < minimum]
    if weak:
        found = ", ".join(f"seed {row['teacher seed']}: {100 * row['accuracy']:.1f}%" for row in weak)
        raise SystemExit(f"reproduce_qad: the teacher does not do the task ({found} held-out exact match, below "
                         f"--min-teacher-accuracy {100 * minimum:.0f}%); no table written")


def student_runs(args, config: QADConfig) -> list[tuple[str, int, float | None]]:
    """``(variant, data seed, lr or None for the recipe's)`` of every student to run."""
    runs = [(name, seed, None) for name in args.variants for seed in args.seeds]
    for name, lrs in ((QAT_SFT, args.qat_lrs), (QAD_SFT, args.qad_lrs)):
        if name in args.variants:
            runs += [(name, args.seeds[0], lr) for lr in lrs if lr != config.training.lr]
    return runs


def mean_spread(values: list[float], digits: int) -> str:
    """``mean ± sample standard deviation`` (the mean alone for one value)."""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def format_value(key: str, values: list) -> str:
    """Accuracy in percent, KL in scientific notation (it spans decades), CE with 4 decimals; "–"
    for a metric the run has not got (no mislabelled problems)."""
    if any(value is None for value in values):
        return "–"
    if key.endswith("accuracy"):
        return mean_spread([100 * value for value in values], 1) + "%"
    if key.endswith("kl"):
        mean = statistics.fmean(values)
        return f"{mean:.2e}" + (f" ± {statistics.stdev(values):.1e}" if len(values) > 1 else "")
    return mean_spread(values, 4)


def teacher_table(rows: list[dict]) -> str:
    """Markdown: the teacher and its SFT stage at every teacher seed, then their means."""
    lines = ["| model | teacher seed | " + " | ".join(title for _, title in COLUMNS) + " | seconds |",
             "|---|---:|" + "---:|" * len(COLUMNS) + "---:|"]
    for name in (TEACHER, SFT_STAGE):
        own = sorted((row for row in rows if row["variant"] == name), key=lambda row: row["teacher seed"])
        groups = [([row], str(row["teacher seed"])) for row in own] + ([(own, "mean")] if len(own) > 1 else [])
        for group, label in groups:
            cells = [format_value(key, [row[key] for row in group]) for key, _ in COLUMNS]
            lines.append(f"| {name} | {label} | " + " | ".join(cells)
                         + f" | {statistics.fmean(row['seconds'] for row in group):.0f} |")
    return "\n".join(lines)


def main_table(results: list[dict]) -> str:
    """Markdown: the teacher's row, then one row per variant (in :data:`VARIANTS` order), mean ±
    spread over its seeds."""
    lines = ["| model | seeds | " + " | ".join(title for _, title in COLUMNS) + " | seconds |",
             "|---|---:|" + "---:|" * len(COLUMNS) + "---:|"]
    for name in (TEACHER, *VARIANTS):
        rows = [row for row in results if row["variant"] == name]
        if rows:
            cells = [format_value(key, [row[key] for row in rows]) for key, _ in COLUMNS]
            lines.append(f"| {name} | {len(rows)} | " + " | ".join(cells)
                         + f" | {statistics.fmean(row['seconds'] for row in rows):.0f} |")
    return "\n".join(lines)


def sweep_table(results: list[dict]) -> str:
    """Markdown: QAT and QAD at every learning rate run (one seed each)."""
    return result_benchmarks.sweep_table(results, COLUMNS, format_value)


def goals(teacher: dict, results: list[dict]) -> str:
    """The paper's claims on accuracy, as measured (means over seeds): its ordering, and the share
    of PTQ's accuracy loss that QAD on the SFT data recovers. Empty unless all four were run."""
    means = {name: statistics.fmean(row["accuracy"] for row in results if row["variant"] == name)
             for name in ("PTQ", QAT_SFT, QAD_SFT) if any(row["variant"] == name for row in results)}
    if len(means) < 3:
        return ""
    order = [teacher["accuracy"], means[QAD_SFT], means["PTQ"], means[QAT_SFT]]
    holds = order[0] >= order[1] > order[2] > order[3]
    loss = teacher["accuracy"] - means["PTQ"]
    recovered = (f"{100 * (means[QAD_SFT] - means['PTQ']) / loss:.0f}% of PTQ's {100 * loss:.1f}-point loss"
                 if loss > 0 else f"nothing to recover (PTQ is not below the teacher: {100 * loss:.1f} points)")
    return (f"The paper's ordering on accuracy, teacher >= QAD > PTQ > QAT (both on the SFT data): "
            f"{'holds' if holds else 'does not hold'} ({' / '.join(f'{100 * value:.1f}%' for value in order)}). "
            f"QAD on the SFT data recovers {recovered}.\n")


def arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="configs/reproduce_task.yaml")
    parser.add_argument("--out", default="runs/reproduce_task", type=Path)
    parser.add_argument("--teacher-seeds", default="1",
                        help="teachers to train (model and data seeds), comma-separated; students use the first")
    parser.add_argument("--min-teacher-accuracy", default=0.95, type=float,
                        help="held-out exact match every teacher must reach for the students' table")
    parser.add_argument("--variants", default="all", help="'all' or comma-separated names of the table's rows")
    parser.add_argument("--seeds", default="1,2,3", help="data seeds of the students, comma-separated")
    parser.add_argument("--qad-lrs", default="1e-5,3e-5", help="learning rates besides the recipe's for QAD on "
                                                               "the SFT data (first seed), comma-separated; '' for none")
    parser.add_argument("--qat-lrs", default="1e-5,3e-5", help="learning rates besides the recipe's for QAT on "
                                                               "the SFT data (first seed), comma-separated; '' for none")
    parser.add_argument("--jobs", default=1, type=int, help="processes running teachers / students at once")
    parser.add_argument("--problems", default=500, type=int, help="held-out task problems to generate answers for")
    parser.add_argument("--eval-windows", default=32, type=int, help="held-out windows of task / general text for KL")
    parser.add_argument("--generated-sequences", default=512, type=int,
                        help="sequences the teacher generates for the teacher-generated variant (per seed)")
    parser.add_argument("--answer-prompts", default=16384, type=int,
                        help="task prompts the teacher answers for the teacher-answers variant (per seed)")
    parser.add_argument("--results", type=Path, help="write the tables into this Markdown file")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every run, key.path=value")
    args = parser.parse_intermixed_args(argv)
    args.variants = variant_names(parser, args.variants, list(VARIANTS))
    args.seeds = number_list(parser, "--seeds", args.seeds, int)
    args.teacher_seeds = number_list(parser, "--teacher-seeds", args.teacher_seeds, int)
    if not args.seeds or not args.teacher_seeds:
        parser.error("--seeds and --teacher-seeds need at least one seed each")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    args.qad_lrs = number_list(parser, "--qad-lrs", args.qad_lrs)
    args.qat_lrs = number_list(parser, "--qat-lrs", args.qat_lrs)
    return args


def report(args, config: QADConfig, teachers: list[dict], results: list[dict], seconds: float) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86_64'})"
    t, teacher = config.training, config.teacher
    tokens = t.train_iters * t.global_batch_size * config.model.seq_length
    task = task_source(config)
    rft = (f", then {teacher.rft_iters} iterations of rejection-sampling fine-tuning on `teacher.rft_sources`"
           if teacher.rft_iters else "")
    sweep = [row for row in results if row["variant"] in (QAT_SFT, QAD_SFT) and row["seed"] == args.seeds[0]]
    main = [row for row in results if row["lr"] is None or row["lr"] == t.lr]
    first = next(row for row in teachers if row["variant"] == TEACHER and row["teacher seed"] == args.teacher_seeds[0])
    text = (f"Device: {device}; date: {datetime.date.today()}; {seconds:.0f} s in all; command: "
            f"`python {' '.join(sys.argv)}`.\n\n"
            f"Teacher: `{args.recipe}`, {teacher.pretrain_iters} pre-training iterations on `data.sources`, then "
            f"{teacher.posttrain_iters} SFT iterations on `teacher.posttrain_sources` ({task['digits']}-digit "
            f"addition, {task.get('format', 'plain')} answers, {100 * task.get('wrong_labels', 0.0):.0f}% of labels "
            f"wrong){rft}. Accuracy: exact match on {args.problems} held-out problems, each asked after "
            f"{with_defaults(task)['prompt_context']} solved training problems (`prompt_context`), and on the held-out "
            f"problems whose SFT label would be wrong; KL(teacher ‖ student) and the student's CE in nats per "
            f"token on {args.eval_windows} held-out windows of each text.\n\n{teacher_table(teachers)}\n\n"
            f"Students of teacher seed {args.teacher_seeds[0]}: every trained student saw {tokens:,} tokens "
            f"(lr {t.lr:g} unless stated). Mean ± sample standard deviation over seeds "
            f"{', '.join(map(str, args.seeds))}.\n\n{main_table([first, *main])}\n\n{goals(first, main)}")
    if any(row["lr"] != t.lr for row in sweep):
        text += f"\nLearning-rate sweep (seed {args.seeds[0]}):\n\n{sweep_table(sweep)}\n"
    return text


def main(argv=None) -> None:
    args = arguments(argv)
    start = time.perf_counter()
    config = base_config(args)
    data = evaluation_data(config, task_source(config), args.problems, args.eval_windows)
    with executor(args.jobs) as pool:
        futures = [pool.submit(train_teacher, args, data, seed) for seed in args.teacher_seeds]
        labels = [f"{TEACHER}, teacher seed {seed}" for seed in args.teacher_seeds]
        teachers = [row for rows in collect(futures, "reproduce_qad", labels) for row in rows]
        check_teachers(teachers, args.min_teacher_accuracy)
        runs = student_runs(args, config)
        futures = [pool.submit(run_student, args, data, name, seed, lr) for name, seed, lr in runs]
        labels = [run_label(name, seed, lr) for name, seed, lr in runs]
        students = collect(futures, "reproduce_qad", labels)
    text = report(args, config, teachers, students, time.perf_counter() - start)
    print(text)
    if args.results:
        write_between_markers(args.results, text, BEGIN, END)


if __name__ == "__main__":
    main()
