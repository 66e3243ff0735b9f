#!/usr/bin/env bash
# Mamba-2 kernels for a GPU machine that cannot build CUDA extensions or reach a package index.
#
#   scripts/wheels/mamba_ssm.sh OUT_DIR [VERSION]      # where pip reaches an index and torch is installed
#
# Writes OUT_DIR/mamba_ssm-VERSION-py3-none-any.whl: mamba-ssm built without its CUDA extensions
# (MAMBA_SKIP_CUDA_BUILD), i.e. its Triton kernels only, which is what megatron.core's MambaMixer
# trains Mamba2 layers with (mamba_chunk_scan_combined, the gated RMSNorm). Without causal-conv1d,
# megatron_qad runs megatron.core's unfused Mamba path (torch conv1d, then the Triton scan).
#
# Also writes OUT_DIR/selective_scan_cuda.py: mamba_ssm/__init__.py imports Mamba-1's CUDA extension
# selective_scan_cuda eagerly although Mamba2 never calls it; this module stands in for it and
# raises ImportError on any use. On the GPU machine:
#   pip install --no-deps --target SITE OUT_DIR/mamba_ssm-*.whl && cp OUT_DIR/selective_scan_cuda.py SITE/
# (einops and huggingface_hub must be installed there too.)
set -euo pipefail
out=$(realpath -m "${1:?usage: $0 OUT_DIR [VERSION]}")
version=${2:-2.3.2.post1}
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
# MAMBA_SKIP_CUDA_BUILD: no CUDA extensions (Triton kernels only); MAMBA_FORCE_BUILD: build here
# instead of fetching a prebuilt CUDA wheel. Both apply to the metadata step of the download too,
# which runs the sdist's setup.py against the torch installed here (no build isolation).
export MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE
"$python" -m pip download --no-deps --no-binary mamba-ssm --no-build-isolation -d "$work" \
  "mamba-ssm==$version"
"$python" -m pip wheel --no-deps --no-build-isolation -w "$out" "$work"/mamba_ssm-"$version".tar.gz
cat > "$out/selective_scan_cuda.py" <<'PY'
"""Stands in for mamba-ssm's Mamba-1 CUDA extension in a Triton-only build (mamba_ssm imports it
eagerly; Mamba2 never calls it). Any use raises ImportError."""


def __getattr__(name):
    raise ImportError(f"selective_scan_cuda.{name}: this mamba-ssm was built without its CUDA "
                      f"extensions (Mamba-1's selective scan); Mamba2 layers do not need it")
PY
echo "wrote $out"
