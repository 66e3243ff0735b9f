"""QAT forgets, QAD recovers: task accuracy and KL of NVFP4 students of a post-trained teacher.

    python benchmarks/reproduce_qad.py [--recipe configs/reproduce_task.yaml] [--out runs/reproduce_task]
        [--variants all | NAME,NAME,...] [--seeds 1,2,3] [--qad-lrs 3e-5,3e-4] [--qat-lrs 3e-5,3e-4]
        [--problems 500] [--eval-windows 32] [--generated-sequences 512] [--results docs/RESULTS.md]
        [key.path=value ...]

The teacher is trained here in two stages (``megatron_qad.train.teacher_stages``): pre-training on
the recipe's general text (``data.sources``), then post-training on a task with checkable answers
(the ``arithmetic`` source in ``teacher.posttrain_sources``), as SFT / RL change a released
model's behaviour. Every student starts from it; the trained ones run ``training.train_iters``
steps of ``training.global_batch_size`` sequences, so all see the same number of tokens:

  BF16 teacher                  the teacher itself
  PTQ, PTQ 4/6                  calibration only (NVFP4, Four Over Six)
  QAT (general text)            cross entropy on the general text's next tokens
  QAD (general text)            KL(teacher || student) on the general text
  QAD (random tokens)           the KL on uniform random token ids
  QAD (teacher-generated)       the KL on text sampled from the teacher (from BOS, temperature 1)
  QAD 4/6 (general text)        QAD with Four Over Six blocks

None of the students sees the task during QAT / QAD. Each is evaluated on the task's held-out
problems (greedy decoding, exact match of the answer after "="), and against the teacher on
held-out task text and general text (KL, CE). Students run once per ``--seeds`` entry (the data
order and calibration batches; the teacher is shared); the table gives mean ± sample standard
deviation. QAT and QAD (when among ``--variants``) also run at the learning rates of ``--qat-lrs``
/ ``--qad-lrs`` (first seed only; the defaults are the values shown) for the LR sweep table.

A run whose ``OUT/.../metrics.json`` exists is not repeated, so an interrupted benchmark continues
and more seeds or LRs can be added later. With ``--results FILE`` the tables go into FILE between
the markers ``<!-- reproduce_qad: begin -->`` and ``<!-- reproduce_qad: end -->`` (the whole file
when it has none).
"""

import argparse
import datetime
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from megatron_qad.config import ConfigError, QADConfig, load_config
from megatron_qad.evaluate.students import evaluate_model, evaluation_data
from megatron_qad.train import checkpointing, run
from megatron_qad.train.arguments import write_summary
from megatron_qad.train.teacher_stages import prepare_teacher

TEACHER = "BF16 teacher"
QAT = "QAT (general text)"
QAD = "QAD (general text)"
VARIANTS = {
    # name: (run mode or None for the teacher itself, recipe overrides)
    TEACHER: (None, []),
    "PTQ": ("ptq", []),
    "PTQ 4/6": ("ptq", ["quantization.format=nvfp4_4over6"]),
    QAT: ("train", ["distill.loss=ce"]),
    QAD: ("train", ["distill.loss=kl"]),
    "QAD (random tokens)": ("train", ["distill.loss=kl", "data.sources=[{type: random}]"]),
    "QAD (teacher-generated)": ("train", ["distill.loss=kl"]),  # data.sources set per seed, see variant_overrides
    "QAD 4/6 (general text)": ("train", ["distill.loss=kl", "quantization.format=nvfp4_4over6"]),
}
TEACHER_GENERATED_BATCH = 64
"""Sequences the teacher extends per forward pass when generating the teacher-generated data."""
BEGIN, END = "<!-- reproduce_qad: begin -->", "<!-- reproduce_qad: end -->"
COLUMNS = (("accuracy", "task accuracy"), ("task kl", "KL, task text"), ("general kl", "KL, general text"),
           ("task student ce", "CE, task text"), ("general student ce", "CE, general text"))


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def variant_overrides(name: str, seed: int, args) -> list[str]:
    """The recipe overrides of variant ``name`` at data seed ``seed``."""
    overrides = [*VARIANTS[name][1], f"data.seed={seed}"]
    if name == "QAD (teacher-generated)":
        cache = args.out / "teacher_generated" / f"seed{seed}.pt"
        overrides.append(f"data.sources=[{{type: teacher_generated, num_sequences: {args.generated_sequences}, "
                         f"batch_size: {TEACHER_GENERATED_BATCH}, cache: '{cache}'}}]")
    return overrides


def base_config(args) -> QADConfig:
    return load_config(args.recipe, [*args.overrides, f"teacher.checkpoint={args.out / 'teacher'}"])


def task_source(config: QADConfig) -> dict:
    """The ``arithmetic`` source of the recipe's post-training data (what accuracy is measured on)."""
    for spec in config.teacher.posttrain_sources or []:
        if isinstance(spec, dict) and spec.get("type") == "arithmetic":
            return spec
    raise ConfigError(f"'teacher.posttrain_sources' of {config.teacher.posttrain_sources!r} has no "
                      f"{{type: arithmetic}} source: the benchmark measures task accuracy on it; add one")


def run_one(args, data, name: str, seed: int, lr: float | None) -> dict:
    """Train / calibrate one student (unless done before) and evaluate it; its metrics."""
    mode, _ = VARIANTS[name]
    directory = args.out / slug(name) / f"seed{seed}" / (f"lr{lr:g}" if lr is not None else "recipe_lr")
    record = directory / "metrics.json"
    if record.is_file():
        return json.loads(record.read_text())
    overrides = [*args.overrides, f"teacher.checkpoint={args.out / 'teacher'}", *variant_overrides(name, seed, args)]
    if lr is not None:
        overrides += [f"training.lr={lr}", f"training.min_lr={lr / 10}"]
    config = load_config(args.recipe, overrides)
    config.data.validation_sources = config.data.validation_sources or base_config(args).data.sources
    config.checkpoint.save, config.checkpoint.resume = str(directory), False
    start = time.perf_counter()
    checkpoint, seconds = None, 0.0
    if mode is not None:
        summary = run(config, mode)
        checkpoint, seconds = checkpointing.student_checkpoint(directory), summary["seconds"]
    metrics = evaluate_model(config, checkpoint, quantized=mode is not None, data=data)
    result = {"variant": name, "seed": seed, "lr": config.training.lr if mode == "train" else None,
              "accuracy": metrics["accuracy"], "run seconds": seconds,
              "seconds": round(time.perf_counter() - start, 1),
              **{f"{split} {key}": value for split in ("task", "general") for key, value in metrics[split].items()}}
    write_summary(record, result)  # atomic: a rerun skips the runs whose record exists
    print(f"{name} (seed {seed}, lr {result['lr']}): {json.dumps(result)}", flush=True)
    return result


def mean_spread(values: list[float], digits: int) -> str:
    """``mean ± sample standard deviation`` (the mean alone for one value)."""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def format_value(key: str, values: list[float]) -> str:
    """Accuracy in percent, KL in scientific notation (it spans decades), CE with 4 decimals."""
    if key == "accuracy":
        return mean_spread([100 * value for value in values], 1) + "%"
    if key.endswith("kl"):
        mean = statistics.fmean(values)
        return f"{mean:.2e}" + (f" ± {statistics.stdev(values):.1e}" if len(values) > 1 else "")
    return mean_spread(values, 4)


def main_table(results: list[dict]) -> str:
    """Markdown: one row per variant (in :data:`VARIANTS` order), mean ± spread over its seeds."""
    lines = ["| model | seeds | " + " | ".join(title for _, title in COLUMNS) + " | seconds |",
             "|---|---:|" + "---:|" * len(COLUMNS) + "---:|"]
    for name in VARIANTS:
        rows = [row for row in results if row["variant"] == name]
        if rows:
            cells = [format_value(key, [row[key] for row in rows]) for key, _ in COLUMNS]
            lines.append(f"| {name} | {len(rows)} | " + " | ".join(cells)
                         + f" | {statistics.fmean(row['seconds'] for row in rows):.0f} |")
    return "\n".join(lines)


def sweep_table(results: list[dict]) -> str:
    """Markdown: QAT and QAD at every learning rate run (one seed each)."""
    lines = ["| model | lr | " + " | ".join(title for _, title in COLUMNS) + " |",
             "|---|---:|" + "---:|" * len(COLUMNS)]
    for row in sorted(results, key=lambda row: (row["variant"], row["lr"])):
        lines.append(f"| {row['variant']} | {row['lr']:g} | "
                     + " | ".join(format_value(key, [row[key]]) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def parse_list(text: str, kind=float) -> list:
    return [kind(item) for item in text.split(",") if item.strip()]


def arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="configs/reproduce_task.yaml")
    parser.add_argument("--out", default="runs/reproduce_task", type=Path)
    parser.add_argument("--variants", default="all", help="'all' or comma-separated names of the table's rows")
    parser.add_argument("--seeds", default="1,2,3", help="data seeds of the students, comma-separated")
    parser.add_argument("--qad-lrs", default="3e-5,3e-4",
                        help="learning rates besides the recipe's for QAD (first seed), comma-separated; '' for none")
    parser.add_argument("--qat-lrs", default="3e-5,3e-4",
                        help="learning rates besides the recipe's for QAT (first seed), comma-separated; '' for none")
    parser.add_argument("--problems", default=500, type=int, help="held-out task problems to generate answers for")
    parser.add_argument("--eval-windows", default=32, type=int, help="held-out windows of task / general text for KL")
    parser.add_argument("--generated-sequences", default=512, type=int,
                        help="sequences the teacher generates for the teacher-generated variant (per seed)")
    parser.add_argument("--results", type=Path, help="write the tables into this Markdown file")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every run, key.path=value")
    args = parser.parse_intermixed_args(argv)
    args.variants = list(VARIANTS) if args.variants == "all" else [name.strip() for name in args.variants.split(",")]
    unknown = [name for name in args.variants if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; the variants are {list(VARIANTS)}")
    args.seeds = parse_list(args.seeds, int)
    if not args.seeds:
        parser.error("--seeds needs at least one seed")
    args.qad_lrs, args.qat_lrs = parse_list(args.qad_lrs), parse_list(args.qat_lrs)
    return args


def report(args, config: QADConfig, results: list[dict], sweep: list[dict], seconds: float) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86_64'})"
    t, teacher = config.training, config.teacher
    tokens = t.train_iters * t.global_batch_size * config.model.seq_length
    text = (f"Device: {device}; date: {datetime.date.today()}; {seconds:.0f} s in all; command: "
            f"`python {' '.join(sys.argv)}`.\n\n"
            f"Teacher: `{args.recipe}`, {teacher.pretrain_iters} pre-training iterations on `data.sources`, then "
            f"{teacher.posttrain_iters} post-training iterations on `teacher.posttrain_sources`. Every trained "
            f"student saw {tokens:,} tokens (lr {t.lr:g} unless stated). Accuracy: exact match on "
            f"{args.problems} held-out problems; KL(teacher ‖ student) and the student's CE in nats per token "
            f"on {args.eval_windows} held-out windows of each text. Mean ± sample standard deviation over "
            f"seeds {', '.join(map(str, args.seeds))}.\n\n{main_table(results)}\n")
    if sweep:
        text += f"\nLearning-rate sweep (seed {args.seeds[0]}):\n\n{sweep_table(sweep)}\n"
    return text


def write_results(path: Path, text: str) -> None:
    """Put ``text`` between the markers of ``path`` (or make ``path`` hold just the marked text)."""
    marked = f"{BEGIN}\n{text}{END}"
    old = path.read_text() if path.is_file() else ""
    if BEGIN in old and END in old:
        before, rest = old.split(BEGIN, 1)
        marked = before + marked + rest.split(END, 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(marked if marked.endswith("\n") else marked + "\n")


def main(argv=None) -> None:
    args = arguments(argv)
    start = time.perf_counter()
    config = base_config(args)
    prepare_teacher(config)
    data = evaluation_data(config, task_source(config), args.problems, args.eval_windows)
    results = [run_one(args, data, name, seed, None) for name in args.variants
               for seed in (args.seeds[:1] if name == TEACHER else args.seeds)]  # the teacher has no seed
    sweep = []
    for name, lrs in ((QAT, args.qat_lrs), (QAD, args.qad_lrs)):
        if lrs and name in args.variants:
            sweep += [row for row in results if row["variant"] == name and row["seed"] == args.seeds[0]]
            sweep += [run_one(args, data, name, args.seeds[0], lr) for lr in lrs if lr != config.training.lr]
    text = report(args, config, results, sweep, time.perf_counter() - start)
    print(text)
    if args.results:
        write_results(args.results, text)


if __name__ == "__main__":
    main()
