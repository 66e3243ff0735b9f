"""PTQ vs QAT vs QAD at an equal token budget, on a teacher trained here from scratch.

    python benchmarks/reproduce_qad.py [--recipe configs/reproduce_small.yaml] [--out runs/reproduce]
                                       [--results docs/RESULTS.md] [key.path=value ...]

The teacher (``teacher.pretrain_iters`` on the recipe's data, kept in OUT/teacher) is shared by
every variant; each student starts from it, is quantized by the recipe's policy (or Four Over
Six) and calibrated (PTQ); training variants then run ``training.train_iters`` steps of the same
global batch size, so all see the same number of tokens:

  PTQ, PTQ 4/6           calibration only
  QAT (CE)               cross entropy on the data's next tokens
  QAD (KL)               KL(teacher || student) at T = 1
  QAD on random tokens   the KL on uniform random token ids (the teacher still labels them)
  QAD 4/6                QAD with Four Over Six blocks

Every variant is evaluated on the same held-out split of the recipe's data. The table (KL to the
teacher, student and teacher CE, top-1 agreement, seconds) is printed and, with --results,
written as Markdown with device, date and command.
"""

import argparse
import datetime
import platform
import re
import sys
from pathlib import Path

import torch

from megatron_qad.config import load_config
from megatron_qad.train import run

VARIANTS = (
    ("PTQ", "ptq", []),
    ("PTQ 4/6", "ptq", ["quantization.format=nvfp4_4over6"]),
    ("QAT (CE)", "train", ["distill.loss=ce"]),
    ("QAD (KL)", "train", []),
    ("QAD on random tokens", "train", ["data.sources=[{type: random}]"]),
    ("QAD 4/6", "train", ["quantization.format=nvfp4_4over6"]),
)


def run_variant(recipe: str, out: Path, name: str, mode: str, overrides: list[str], variant: list[str]) -> dict:
    """One variant's summary (its run directory OUT/<name>); validation on the recipe's own data."""
    config = load_config(recipe, [*overrides, f"teacher.checkpoint={out / 'teacher'}", *variant])
    if config.data.validation_sources is None:
        config.data.validation_sources = load_config(recipe, overrides).data.sources
    config.checkpoint.save = str(out / re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_"))
    config.checkpoint.resume = False
    return run(config, mode)


def table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| student | KL(teacher ‖ student) | student CE | teacher CE | top-1 agreement | seconds |",
             "|---|---|---|---|---|---|"]
    for name, summary in rows:
        m = summary["final"]
        lines.append(f"| {name} | {m['kl']:.4e} | {m['student ce']:.4f} | {m['teacher ce']:.4f} | "
                     f"{m['top1 agreement']:.4f} | {summary['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="configs/reproduce_small.yaml")
    parser.add_argument("--out", default="runs/reproduce", type=Path)
    parser.add_argument("--results", type=Path, help="write the table as Markdown here")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every variant, key.path=value")
    args = parser.parse_intermixed_args()
    rows = []
    for name, mode, variant in VARIANTS:
        rows.append((name, run_variant(args.recipe, args.out, name, mode, args.overrides, variant)))
        print(f"{name}: {rows[-1][1]['final']}", flush=True)
    text = table(rows)
    print(text)
    if args.results:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86_64'})"
        config = load_config(args.recipe, args.overrides)
        tokens = config.training.train_iters * config.training.global_batch_size * config.model.seq_length
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(
            f"# PTQ vs QAT vs QAD\n\nDevice: {device}; date: {datetime.date.today()}; command: "
            f"`python {' '.join(sys.argv)}`.\n\nTeacher: `{args.recipe}` trained from scratch for "
            f"{config.teacher.pretrain_iters} iterations; every trained student saw {tokens:,} tokens. "
            f"Validation: the held-out split of the recipe's data.\n\n{text}\n")


if __name__ == "__main__":
    main()
