"""``megatron-qad`` command line. Subcommands, each ``COMMAND RECIPE [key.path=value ...]``:

  ``train``    QAD (or QAT, by ``distill.loss``): teacher, PTQ baseline, training, checkpoints;
  ``ptq``      calibrate the student and evaluate it against the teacher (no training);
  ``eval``     the run's newest student against the teacher: KL, CE, top-1, per-layer weight error;
  ``export``   the run's newest student as an NVFP4 Hugging Face checkpoint (one process);
  ``inspect``  build the student and print its quantization report;

and ``import HF_DIR --out DIR [--recipe BASE.yaml]``: a Hugging Face checkpoint as the dist
checkpoint ``teacher.checkpoint: DIR`` loads, with its recipe's model section (``DIR/model.yaml``).

All run as one process (the CPU when no GPU is visible) or under torchrun / the launchers in
``scripts/``, where every rank takes its shard and rank 0 prints. ``train`` and ``ptq`` print the
resolved recipe first and save it next to the checkpoints (``checkpoint.save/config.yaml``;
``logging.console: quiet`` prints only where, and keeps Megatron's own output in
``checkpoint.save/megatron.log``). A run ends with a few lines for a person (:mod:`megatron_qad.train.summary`:
PTQ and final KL, CE and top-1 agreement, tokens, time, where the student is, the record
``checkpoint.save/summary.json``) and the commands to run next.

Exit codes: 0 success, 2 bad command line, invalid recipe or unusable input (a data file, a damaged
checkpoint or one of another architecture, an output path under a regular file: the one-line message
says which key or file and how to fix it, without a traceback), 130 interrupted (Ctrl-C).
"""

import argparse
import logging
import os
import shlex
import sys
import textwrap
import time
import warnings
from pathlib import Path

from .config import ConfigError, QADConfig, load_config, to_dict

# Notices megatron.core and torch print on every CPU-only start; they say nothing about the run.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex|absl\.logging).* not installed")
warnings.filterwarnings("ignore", message=r"Only transformer-engine>=\S+ supports MoE experts, but your version is 0\.0\.0")
warnings.filterwarnings("ignore", message=r"'pin_memory' argument is set as true but no accelerator is found")
warnings.filterwarnings("ignore", message=r"MimoModelConfig is experimental")  # megatron.core's import notice
# torch.distributed.checkpoint's notices on every dist-checkpoint load (megatron.core's loader).
warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized")
warnings.filterwarnings("ignore", message=r"The argument order of load has been changed")
warnings.filterwarnings("ignore", message=r"Please use DTensor instead and we are deprecating ShardedTensor")
# megatron.training's advice to pass a model config object; the package's model provider builds the model.
warnings.filterwarnings("ignore", message=r"\s*It is recommended to use a ModelConfig")
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found"
logging.getLogger("megatron.core.models.gpt.gpt_model").setLevel(logging.ERROR)  # "GPTModel IS DEPRECATED"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-qad",
        description="Quantization-aware distillation of Megatron models to NVFP4.",
        epilog="'megatron-qad COMMAND --help' shows a command's arguments. Recipe keys: the dataclasses of "
               "megatron_qad/config.py; Megatron-LM's own flags: scripts/pretrain_qad.py --help.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "inspect", help="build the recipe's student and print its quantization report",
        description="Build the recipe's model (one process; CPU without a GPU), quantize it with the "
                    "recipe's policy, and print for every linear layer its kind, weight and input "
                    "format, and the relative NVFP4 and Four Over Six error of its weight.")
    for command, text in (("train", "quantization-aware distillation (or QAT) of the recipe's student"),
                          ("ptq", "calibrate the recipe's student and evaluate it against the teacher"),
                          ("eval", "evaluate the run's trained student against the teacher on held-out data"),
                          ("export", "write the run's student as an NVFP4 Hugging Face checkpoint")):
        commands.add_parser(command, help=text, description=text[0].upper() + text[1:] + ".")
    for command in commands.choices.values():
        command.add_argument("config", help="YAML recipe, e.g. configs/tiny_cpu.yaml")
        command.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                             help="recipe overrides, e.g. training.train_iters=50")
    importer = commands.add_parser(
        "import", help="convert a Hugging Face checkpoint into a teacher checkpoint and its model section",
        description="Read a Hugging Face checkpoint (config.json + safetensors), write the megatron.core dist "
                    "checkpoint that 'teacher.checkpoint: DIR' loads, DIR/model.yaml (the recipe's model "
                    "section), DIR/hf_tokenizer/ (its tokenizer, chat template and generation config, which "
                    "exports copy) and, with --recipe, DIR/recipe.yaml (the base recipe with that model). One process.")
    importer.add_argument("hf_dir", help="Hugging Face checkpoint directory")
    importer.add_argument("--out", required=True, help="new (or empty) output directory")
    importer.add_argument("--recipe", help="base recipe whose other sections recipe.yaml keeps")
    importer.add_argument("--params-dtype", choices=("bfloat16", "float32"),
                          help="dtype of the written weights (default: the base recipe's, else float32 for a "
                               "float32 checkpoint and bfloat16 otherwise)")
    return parser


def format_config(config: QADConfig, width: int = 100) -> str:
    """One wrapped ``section: key=value ...`` paragraph per recipe section."""
    lines = []
    for section, values in to_dict(config).items():
        text = " ".join(f"{key}={value}" for key, value in values.items())
        lines.append(textwrap.fill(text, width=width, initial_indent=f"  {section}: ",
                                   subsequent_indent=" " * (len(section) + 4)))
    return "\n".join(lines)


def run_inspect(config_path: str, overrides: list[str]) -> None:
    """Load the recipe, build its model in this process, and print the config and the weight report."""
    config = load_config(config_path, overrides)  # before importing megatron.core: bad recipes fail fast
    from . import models, parallel, quantize

    context = parallel.initialize(config.parallel, seed=config.model.seed)
    try:
        start = time.perf_counter()
        model = models.build_model(config.model, config.parallel, context.device)
        built_s = time.perf_counter() - start
        report = quantize.apply(model, config.quantization.to_policy())
        if context.rank == 0:
            print(f"config {config_path}" + (f" (overrides: {' '.join(overrides)})" if overrides else ""))
            print(format_config(config))
            print(f"model: {type(model).__name__}, {report.total_params:,} parameters on rank 0 "
                  f"of {context.world_size}, device {context.device} ({context.backend}), "
                  f"built in {built_s:.2f} s")
            print()
            print(report.format_table())
    finally:
        parallel.destroy()


def run_training(mode: str, config_path: str, overrides: list[str]) -> dict:
    """``train`` / ``ptq`` / ``eval``: print the resolved recipe (rank 0; with ``logging.console:
    quiet`` where it is saved instead), train a two-stage teacher first where the recipe asks for
    one, and run it; a finished run ends with the commands to run next. Returns the summary."""
    config = load_config(config_path, overrides)
    from .train import run
    from .train.summary import next_lines
    from .train.teacher_stages import prepare_teacher

    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:
        given = f"config {config_path}" + (f" (overrides: {' '.join(overrides)})" if overrides else "")
        if config.logging.console == "quiet" and config.checkpoint.save:
            print(f"{given}; resolved in {Path(config.checkpoint.save) / 'config.yaml'}", flush=True)
        else:
            print(given)
            print(format_config(config), flush=True)
    summary = prepare_teacher(config) or run(config, mode)  # a teacher stage that stopped ends the run
    if rank0 and not summary.get("exit_code") and "stopped_at" not in summary:
        print("\n".join(next_lines(mode, lambda command: shlex.join(["megatron-qad", command, config_path,
                                                                        *overrides]))), flush=True)
    return summary


def run_export(config_path: str, overrides: list[str]) -> None:
    """``export``: write the run's student as an NVFP4 Hugging Face checkpoint; print where."""
    config = load_config(config_path, overrides)
    from .export import export

    print(f"exported {export(config)}")


def run_megatron_command_line(argv: list[str]) -> int:
    """``scripts/pretrain_qad.py``: QAD for a Megatron-LM command line (see that script); the
    exit code (Megatron's when it stopped the run, 2 for a setting error)."""
    from .train.megatron import run_pretrain

    from .train.summary import next_lines

    try:
        summary = run_pretrain(argv)
    except ConfigError as err:
        print(f"pretrain_qad: error: {err}", file=sys.stderr)
        return 2
    save = (summary.get("checkpoint") or {}).get("iteration") and summary["checkpoint"]["dir"]
    if (int(os.environ.get("RANK", "0")) == 0 and save and summary["mode"] == "train"
            and not summary.get("exit_code") and "stopped_at" not in summary):
        print("\n".join(next_lines("train", lambda command: f"megatron-qad {command} RECIPE "
                                                            f"{shlex.quote(f'checkpoint.save={save}')}")
                        + ["      # RECIPE: a recipe of this model and teacher, e.g. the one 'megatron-qad import' "
                           "writes; the student loads in Megatron-LM with --load"]), flush=True)
    return int(summary.get("exit_code") or 0)


def run_import(hf_dir: str, out: str, recipe: str | None, params_dtype: str | None) -> None:
    """``import``: convert the checkpoint at ``hf_dir``; print what was written."""
    from .hf_import import import_checkpoint

    result = import_checkpoint(hf_dir, out, base_recipe=recipe, params_dtype=params_dtype)
    print(f"imported {hf_dir} ({result.family}, {result.model.params_dtype}) -> {result.directory}")
    print(f"model section: {result.model_yaml}" + (f"; recipe: {result.recipe_yaml}" if result.recipe_yaml else ""))
    print(f"for exports: {', '.join(result.serving_files)} in {result.directory / 'hf_tokenizer'}" if result.serving_files
          else f"for exports: {hf_dir} has no tokenizer, chat template or generation_config.json to copy")


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: sys.argv[1:]); return the exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse has printed the usage and the error
        return int(exit_.code or 0)
    try:
        if args.command == "inspect":
            run_inspect(args.config, args.overrides)
        elif args.command == "export":
            run_export(args.config, args.overrides)
        elif args.command == "import":
            run_import(args.hf_dir, args.out, args.recipe, args.params_dtype)
        else:
            return int(run_training(args.command, args.config, args.overrides).get("exit_code") or 0)
    except ConfigError as err:
        print(f"megatron-qad: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the shell's convention for SIGINT, 128 + 2
        print("megatron-qad: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
