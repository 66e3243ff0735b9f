#!/usr/bin/env bash
# Run a recipe on the GPUs of this machine: one torchrun, one rank per GPU.
#
#   scripts/torchrun_single_node.sh configs/tiny_cpu.yaml model.num_layers=2
#   DRY_RUN=1 NPROC=2 scripts/torchrun_single_node.sh configs/tiny_cpu.yaml
#
# Environment:
#   NPROC     ranks to start (default: the GPUs `nvidia-smi -L` lists, else 1)
#   DRY_RUN   1: print the torchrun command and its environment, run nothing
#   PYTHON    interpreter (default: the repository's .venv/bin/python if present, else python3)
#
# It calls scripts/launch.py --nodes 1, the code path of the SLURM launcher (docs/LAUNCH.md).
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: [NPROC=N] [DRY_RUN=1] scripts/torchrun_single_node.sh RECIPE [key.path=value ...]" >&2
  exit 2
fi

scripts=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-$scripts/../.venv/bin/python}
if [ -z "${PYTHON:-}" ] && [ ! -x "$python" ]; then
  python=python3
fi

options=(--nodes 1)
if [ -n "${NPROC:-}" ]; then
  options+=(--gpus-per-node "$NPROC")
fi
if [ "${DRY_RUN:-0}" = 1 ]; then
  options+=(--dry-run)
fi
exec "$python" "$scripts/launch.py" "$@" "${options[@]}"
