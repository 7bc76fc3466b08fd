#!/usr/bin/env bash
# Build (once) and print the path of a llama-cpp-python wheel compiled without AMX, from the
# pinned sdist with localbot's llama.cpp patches (scripts/llama_sources.sh).
#
# Why: a native build on AMX-capable Xeons segfaults in ggml_backend_amx_mul_mat on the first
# multi-token decode (llama.cpp #20824), so we pin the CPU features explicitly
# (scripts/llama_cpu_flags.sh: AVX-512 where the CPU has it).  pip caches wheels built from an
# sdist regardless of CMAKE_ARGS, so we never let pip's cache decide: the wheel lives in a
# project-owned folder keyed by the version, the exact build flags and the patches.
set -euo pipefail

PY=${PYTHON:-python3}
VERSION=${LLAMA_CPP_VERSION:?LLAMA_CPP_VERSION must be set}
FLAGS=$("$(dirname "$0")/llama_cpu_flags.sh")  # AVX2; AVX-512 where the CPU has it; never AMX
PATCHES=$("$(dirname "$0")/llama_sources.sh" --key)
KEY=$(printf '%s|%s|%s' "$VERSION" "$FLAGS" "$PATCHES" | sha256sum | cut -c1-16)
CACHE_ROOT=${LOCALBOT_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/localbot/wheels}
DEST="$CACHE_ROOT/llama-cpp-python-$VERSION-$KEY"

wheel=$(ls "$DEST"/llama_cpp_python-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
  echo "building llama-cpp-python $VERSION without AMX (about 5 minutes on 2 cores)..." >&2
  mkdir -p "$CACHE_ROOT"
  tmp=$(mktemp -d "$CACHE_ROOT.tmp.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  src=$(PYTHON="$PY" "$(dirname "$0")/llama_sources.sh" "$VERSION" "$tmp/src")
  CMAKE_ARGS="$FLAGS" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    "$PY" -m pip wheel --no-deps --no-cache-dir "$src" -w "$tmp/wheel" >&2
  rm -rf "$DEST"
  mv "$tmp/wheel" "$DEST"
  wheel=$(ls "$DEST"/llama_cpp_python-*.whl | head -n1)
fi
echo "$wheel"
