"""How much a toy teacher's task accuracy depends on what precedes the prompt.

    python benchmarks/prompt_context.py --out runs/reproduce_task [--contexts 0,4,16] [OVERRIDES...]

For every teacher seed that ``benchmarks/reproduce_qad.py --out OUT`` trained (``OUT/teacher<SEED>``),
its SFT stage and its teacher (after RFT), where saved, answer the recipe task's first
``--problems`` held-out problems greedily after each ``--contexts`` entry's number of solved training
problems (:func:`megatron_qad.data.tasks.answer_prompts` after that many ``context`` problems). Prints one
line per model and context: exact match, and teacher-forced exact match (every answer digit the
argmax given the correct earlier ones, so no error compounds). ``OVERRIDES`` are the recipe overrides
the benchmark ran with (the model's shape must match). One process, TP = PP = 1.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_qad import parallel  # noqa: E402
from megatron_qad.config import load_config  # noqa: E402
from megatron_qad.data.sources import with_defaults  # noqa: E402
from megatron_qad.data.tasks import (END_OF_ANSWER, Problem, answer_prompts, asked_and_context,  # noqa: E402
                                   problems_in_split, source_problems)
from megatron_qad.evaluate.students import TOKENIZER, load_model, logits_function, task_accuracy  # noqa: E402
from megatron_qad.train.teacher_stages import rft_dirs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def forced_accuracy(logits_of, problems: list[Problem], prompts: list[list[int]], batch_size: int) -> float:
    """The fraction of ``problems`` whose every answer token (and the newline after it) is the
    argmax of the model's logits given ``prompts`` and the correct answer's earlier tokens."""
    right = 0
    for first in range(0, len(problems), batch_size):
        rows = [(prompts[i], TOKENIZER.encode(problems[i].answer + END_OF_ANSWER))
                for i in range(first, min(first + batch_size, len(problems)))]
        for length in {len(prompt) + len(answer) for prompt, answer in rows}:
            same = [(prompt, answer) for prompt, answer in rows if len(prompt) + len(answer) == length]
            tokens = torch.tensor([prompt + answer for prompt, answer in same])
            chosen = logits_of(tokens).float().argmax(dim=-1).cpu()
            for row, (prompt, answer) in enumerate(same):
                right += chosen[row, len(prompt) - 1:length - 1].tolist() == answer
    return right / len(problems)


def models_of(config, directory: Path) -> list[tuple[str, Path]]:
    """``(name, checkpoint)`` of a teacher seed's saved SFT stage and teacher."""
    saved = [("SFT stage", rft_dirs(config)[0]), ("teacher", directory / "teacher")]
    return [(name, path) for name, path in saved if path.exists()]


def arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the --out of benchmarks/reproduce_qad.py")
    parser.add_argument("--recipe", type=Path, default=ROOT / "configs" / "reproduce_task.yaml")
    parser.add_argument("--contexts", default="0,4,16", help="numbers of solved problems before the prompt")
    parser.add_argument("--problems", type=int, default=500, help="held-out problems asked")
    parser.add_argument("--batch", type=int, default=100, help="prompts per forward pass")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        args.contexts = [int(item) for item in args.contexts.split(",")]
    except ValueError:
        parser.error(f"--contexts: {args.contexts!r} is not a comma-separated list of integers")
    if any(count < 0 for count in args.contexts):
        parser.error(f"--contexts: {args.contexts} has a negative number of solved problems; use counts >= 0")
    return args


def main(argv=None) -> list[dict]:
    args = arguments(argv)
    directories = sorted(args.out.glob("teacher*"), key=lambda path: path.name)
    if not directories:
        sys.exit(f"prompt_context: {args.out} holds no teacher<SEED> directory; pass the --out of "
                 f"benchmarks/reproduce_qad.py")
    rows = []
    for directory in directories:
        seed = int(directory.name.removeprefix("teacher"))
        config = load_config(args.recipe, [*args.overrides, f"teacher.checkpoint={directory / 'teacher'}",
                                           f"model.seed={seed}", f"data.seed={seed}"])
        task = with_defaults(next(spec for spec in config.teacher.posttrain_sources if spec.get("type") == "arithmetic"))
        every = source_problems(task)
        problems = problems_in_split(every, "validation")[:args.problems]
        train_problems = len(problems_in_split(every, "train"))
        if max(args.contexts) >= train_problems:
            sys.exit(f"prompt_context: --contexts {max(args.contexts)} needs more solved problems than the task's "
                     f"{train_problems} training problems; use fewer")
        for name, checkpoint in models_of(config, directory):
            context = parallel.initialize(config.parallel, seed=seed)
            try:
                logits_of = logits_function(load_model(config, checkpoint, context.device, quantized=False),
                                            context.device)
                for count in args.contexts:
                    prompts = answer_prompts(asked_and_context(every, count)[1], problems, TOKENIZER)
                    row = {"teacher seed": seed, "model": name, "context": count,
                           "accuracy": task_accuracy(logits_of, problems, prompts, args.batch),
                           "forced accuracy": forced_accuracy(logits_of, problems, prompts, args.batch)}
                    print(f"prompt_context: teacher seed {seed}, {name}, after {count} solved problems: exact match "
                          f"{100 * row['accuracy']:.1f} %, teacher-forced {100 * row['forced accuracy']:.1f} %",
                          flush=True)
                    rows.append(row)
            finally:
                parallel.destroy()
    return rows


if __name__ == "__main__":
    main()
