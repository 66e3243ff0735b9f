#!/usr/bin/env bash
# Print the path of a Python >= 3.12 interpreter (megatron-core 0.19 needs it).
# Order: $PYTHON if set, python3.12/python3.13 on PATH, pyenv's newest 3.12/3.13, plain python3.
set -euo pipefail
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }
candidates=()
[ -n "${PYTHON:-}" ] && candidates+=("$PYTHON")
candidates+=(python3.12 python3.13)
if command -v pyenv >/dev/null 2>&1; then
  root=$(pyenv root)
  for v in $(ls -1 "$root/versions" 2>/dev/null | grep -E '^3\.1[23]\.[0-9]+$' | sort -t. -k2,2n -k3,3n); do
    candidates+=("$root/versions/$v/bin/python3")
  done
fi
candidates+=(python3)
for c in "${candidates[@]}"; do
  if ok "$c"; then command -v "$c" || echo "$c"; exit 0; fi
done
echo "No Python >= 3.12 found: install one (e.g. 'pyenv install 3.12') or set PYTHON=/path/to/python3.12" >&2
exit 1
