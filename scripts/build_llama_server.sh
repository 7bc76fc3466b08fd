#!/usr/bin/env bash
# Build (once) and print the path of llama.cpp's `llama-server`, from the llama.cpp sources that
# the sdist of the pinned llama-cpp-python vendors (vendor/llama.cpp, tools/server included),
# with the same patches as the bot's wheel (scripts/llama_sources.sh).
#
# Same CPU flags as scripts/build_llama_wheel.sh (no AMX: llama.cpp #20824), and the web UI is
# not downloaded (LLAMA_USE_PREBUILT_UI=OFF): nothing but the package registry is reached.  The
# binary lives in a project-owned cache keyed by the version, the exact build flags and the
# patches.
set -euo pipefail

PY=${PYTHON:-python3}
VERSION=${LLAMA_CPP_VERSION:-0.3.36}
FLAGS=$("$(dirname "$0")/llama_cpu_flags.sh")  # AVX2; AVX-512 where the CPU has it; never AMX
PATCHES=$("$(dirname "$0")/llama_sources.sh" --key)
SERVER_FLAGS="-DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DCMAKE_BUILD_TYPE=Release"
KEY=$(printf '%s|%s|%s|%s' "$VERSION" "$FLAGS" "$SERVER_FLAGS" "$PATCHES" | sha256sum | cut -c1-16)
CACHE_ROOT=${LOCALBOT_SERVER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/localbot/llama-server}
DEST="$CACHE_ROOT/llama-server-$VERSION-$KEY"

if [ ! -x "$DEST/llama-server" ]; then
  echo "building llama-server from llama-cpp-python $VERSION's sources (several minutes)..." >&2
  mkdir -p "$CACHE_ROOT"
  work=$(mktemp -d "$CACHE_ROOT.tmp.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  src="$(PYTHON="$PY" "$(dirname "$0")/llama_sources.sh" "$VERSION" "$work")/vendor/llama.cpp"
  CMAKE=$(command -v cmake || true)
  if [ -z "$CMAKE" ]; then  # a fresh machine: CMake from the package registry
    "$PY" -m pip install -q "cmake>=3.21" >&2
    CMAKE="$(dirname "$PY")/cmake"
  fi
  # shellcheck disable=SC2086  # the flags are words
  "$CMAKE" -S "$src" -B "$work/build" $FLAGS $SERVER_FLAGS >&2
  "$CMAKE" --build "$work/build" --target llama-server -j "${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" >&2
  # Linked statically: one self-contained file, whatever happens to the build folder.
  "$work/build/bin/llama-server" --version >&2
  rm -rf "$DEST"
  mkdir -p "$DEST"
  cp "$work/build/bin/llama-server" "$DEST/llama-server"
fi
echo "$DEST/llama-server"
