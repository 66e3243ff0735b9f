#!/usr/bin/env bash
# Transformer Engine for a GPU machine without internet whose file transfers are size-limited.
#
#   scripts/wheels/transformer_engine.sh fetch DIR [PART_MIB]   # where pip reaches an index (torch installed)
#   scripts/wheels/transformer_engine.sh install DIR SITE       # on the GPU machine (nvcc, torch, pip)
#
# fetch writes to DIR, for TE $TE_VERSION (default 2.20.2) and CUDA $TE_CUDA (default 13, torch cu13):
#   transformer_engine-*.whl               the Python package (pure Python)
#   transformer_engine_cuXX-*.whl.partNN   the core library wheel (~280 MB), in parts of at most
#                                          PART_MIB MiB (default 55) that can travel separately
#   transformer_engine_cuXX.sha256         its checksum
#   transformer_engine_torch-*.tar.gz      the PyTorch extension's source (C++ only, no CUDA kernels)
#   nvidia_cudnn_frontend-*.whl            headers the extension builds against
#   deps/*.whl                             what `import transformer_engine.pytorch` needs besides torch
#                                          and pydantic (einops, onnx, onnxscript and theirs)
# The parts may travel in several transfers; install needs them all in DIR again.
#
# install joins and checks the core wheel, installs the wheels into SITE (pip --target), builds the
# PyTorch extension against the installed torch (a few minutes on 16 cores; the built wheel is kept
# in DIR/built and reused by a later install: a wheel built on another machine against the same
# torch and Python can be put there to skip the build) and checks `import transformer_engine.pytorch`.
# Then: export PYTHONPATH=SITE:$PYTHONPATH.
set -euo pipefail
version=${TE_VERSION:-2.20.2}
cuda=${TE_CUDA:-13}
python=${PYTHON:-python3}
core=transformer_engine_cu$cuda

fetch() {
  local dir=$1 part_mib=${2:-55}
  mkdir -p "$dir"
  local wheel_args=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
                    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64)
  "$python" -m pip download "${wheel_args[@]}" -d "$dir" "transformer_engine==$version" "$core==$version" \
      "nvidia-cudnn-frontend>=1.29"
  "$python" -m pip download "${wheel_args[@]}" -d "$dir/deps" einops onnx onnxscript onnx_ir ml_dtypes protobuf
  # The extension's source: its metadata step runs setup.py against the torch installed here.
  "$python" -m pip download --no-deps --no-binary transformer-engine-torch --no-build-isolation -d "$dir" \
      "transformer_engine_torch==$version"
  local wheel
  wheel=$(ls "$dir"/"$core"-"$version"-*.whl)
  (cd "$dir" && sha256sum "$(basename "$wheel")" > "$core.sha256")
  split -b "${part_mib}M" -d "$wheel" "$wheel.part"
  rm "$wheel"
  ls -l "$dir"
}

install() {
  local dir=$1 site=$2
  mkdir -p "$site" "$dir/built"
  local first wheel
  first=$(ls "$dir"/"$core"-"$version"-*.whl.part00)
  wheel=${first%.part00}
  cat "$wheel".part?? > "$wheel"
  (cd "$dir" && sha256sum -c "$core.sha256")
  local wheels=("$dir"/transformer_engine-"$version"-*.whl "$wheel" "$dir"/nvidia_cudnn_frontend-*.whl "$dir"/deps/*.whl)
  if ! ls "$dir"/built/transformer_engine_torch-"$version"-*.whl >/dev/null 2>&1; then
    local src build_site
    src=$(mktemp -d)
    build_site=$(mktemp -d)
    "$python" -m pip install -q --no-index --no-deps --target "$build_site" "${wheels[@]}"
    tar -xzf "$dir"/transformer_engine_torch-"$version".tar.gz -C "$src"
    # FORCE_BUILD: compile here rather than download a prebuilt extension.
    PYTHONPATH=$build_site:${PYTHONPATH:-} NVTE_PYTORCH_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS:-16} \
      "$python" -m pip wheel -q --no-deps --no-build-isolation -w "$dir/built" "$src"/transformer_engine_torch-"$version"
    rm -rf "$src" "$build_site"
  fi
  # One pip call: its wheels share the transformer_engine/ package directory, which a second
  # `pip install --target` would not merge into.
  "$python" -m pip install -q --no-index --no-deps --target "$site" "${wheels[@]}" \
      "$dir"/built/transformer_engine_torch-"$version"-*.whl
  rm "$wheel"
  PYTHONPATH=$site:${PYTHONPATH:-} "$python" -c "import transformer_engine.pytorch; print('transformer_engine', transformer_engine.__version__, 'ok')"
}

case ${1:-} in
  fetch) fetch "${2:?DIR}" "${3:-55}" ;;
  install) install "${2:?DIR}" "${3:?SITE}" ;;
  *) sed -n 2,20p "$0"; exit 2 ;;
esac
