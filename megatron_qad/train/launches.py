"""What trained each checkpoint of a directory: one settings file per launch.

    provider = recorded(datasets_provider, args, argv, rank0)   # what pretrain() is given

Every run that saves into ``--save`` (``checkpoint.save``) adds ``launches/NNNN.yaml`` there: when,
where and as what it started, the iteration it resumed (0: a fresh run), its Megatron-LM command
line and, for a recipe run, the resolved recipe. The checkpoints after a launch's start iteration,
up to the next launch's, are that launch's. ``config.yaml`` beside them is the latest launch's
recipe (``megatron-qad train`` prints the same settings first). Each file is written atomically,
by rank 0, once the run's checks passed: after Megatron built the model, loaded the teacher and any
checkpoint, and the dataset provider checked the data. A refused run changes neither.
"""

from __future__ import annotations

import argparse
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

import yaml

from ..atomic_files import write_text


LAUNCHES = "launches"
RECIPE = "config.yaml"


def record(args: argparse.Namespace, argv: list[str]) -> Path:
    """Add this launch's settings file to ``args.save`` (and its recipe as ``config.yaml``); return
    the file. ``args``: Megatron's arguments once it loaded any checkpoint (``args.iteration``);
    ``argv``: the Megatron-LM command line the run was given."""
    save = Path(args.save)
    launches = save / LAUNCHES
    launches.mkdir(parents=True, exist_ok=True)
    number = 1 + max((int(path.stem) for path in launches.glob("*.yaml") if path.stem.isdigit()), default=0)
    recipe = Path(args.qad_recipe).read_text() if args.qad_recipe else None
    settings = {
        "launch": number,
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "command": args.qad_command if args.qad_mode == "qad" else "teacher",
        "start_iteration": args.iteration,  # the checkpoint Megatron loaded (--load), else 0
        "argv": list(argv),
        "recipe": yaml.safe_load(recipe) if recipe else None,
    }
    header = (f"# Launch {number} of {save}: the settings that trained the checkpoints after iteration "
              f"{settings['start_iteration']}, up to the next launch's start.\n")
    path = launches / f"{number:04d}.yaml"
    write_text(path, header + yaml.safe_dump(settings, sort_keys=False))
    if recipe:
        write_text(save / RECIPE, recipe)
    return path


def recorded(provider, args: argparse.Namespace, argv: list[str], rank0: bool):
    """Megatron's dataset provider ``provider``, recording this launch (:func:`record`, on rank 0
    with ``--save``) after its first call: the last of the run's checks before training."""
    done = False

    def provide(train_valid_test_num_samples, vp_stage: int | None = None):
        nonlocal done
        datasets = provider(train_valid_test_num_samples, vp_stage=vp_stage)
        if not done and rank0 and args.save:
            record(args, argv)
        done = True
        return datasets

    provide.is_distributed = getattr(provider, "is_distributed", False)
    return provide
