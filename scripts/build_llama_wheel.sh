#!/usr/bin/env bash
# Build (once) and print the path of a llama-cpp-python wheel compiled without AMX.
#
# Why: a native build on AMX-capable Xeons segfaults in ggml_backend_amx_mul_mat on the first
# multi-token decode (llama.cpp #20824), so we pin the CPU features explicitly
# (scripts/llama_cpu_flags.sh: AVX-512 only if asked for).  pip caches wheels built from an
# sdist regardless of CMAKE_ARGS, so we never let pip's cache decide: the wheel lives in a
# project-owned folder keyed by the version and the exact build flags.
set -euo pipefail

PY=${PYTHON:-python3}
VERSION=${LLAMA_CPP_VERSION:?LLAMA_CPP_VERSION must be set}
FLAGS=$("$(dirname "$0")/llama_cpu_flags.sh")  # AVX2; AVX-512 if asked for; never AMX
KEY=$(printf '%s|%s' "$VERSION" "$FLAGS" | sha256sum | cut -c1-16)
CACHE_ROOT=${LOCALBOT_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/localbot/wheels}
DEST="$CACHE_ROOT/llama-cpp-python-$VERSION-$KEY"

wheel=$(ls "$DEST"/llama_cpp_python-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
  echo "building llama-cpp-python $VERSION without AMX (about 5 minutes on 2 cores)..." >&2
  tmp=$(mktemp -d "$CACHE_ROOT.tmp.XXXXXX" 2>/dev/null || { mkdir -p "$CACHE_ROOT"; mktemp -d "$CACHE_ROOT.tmp.XXXXXX"; })
  CMAKE_ARGS="$FLAGS" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    "$PY" -m pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python \
    "llama-cpp-python==$VERSION" -w "$tmp" >&2
  mkdir -p "$(dirname "$DEST")"
  rm -rf "$DEST"
  mv "$tmp" "$DEST"
  wheel=$(ls "$DEST"/llama_cpp_python-*.whl | head -n1)
fi
echo "$wheel"
