#!/usr/bin/env python3
"""Start a recipe with one rank per GPU, on this machine or on every node of a SLURM allocation.

    python scripts/launch.py configs/tiny_cpu.yaml model.num_layers=2 --dry-run

See megatron_qad/launch.py and docs/LAUNCH.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package, installed or not

from megatron_qad.launch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
