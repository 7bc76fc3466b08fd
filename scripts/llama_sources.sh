#!/usr/bin/env bash
# Unpack the pinned llama-cpp-python sdist into DIR, apply localbot's llama.cpp patches to its
# vendor/llama.cpp, and print the unpacked folder:   llama_sources.sh VERSION DIR
#                                                     llama_sources.sh --key   (the patches' hash)
#
# The patches (scripts/patches/llama.cpp/*.patch, in name order) are few and small, each with its
# reason beside the code it changes.  Both build scripts use this, so the bot and the llama-server
# it is measured against run the same llama.cpp.
set -euo pipefail

PATCHES=$(cd "$(dirname "$0")/patches/llama.cpp" && pwd)
if [ "${1:-}" = "--key" ]; then
  cat "$PATCHES"/*.patch | sha256sum | cut -c1-16
  exit 0
fi
VERSION=${1:?usage: llama_sources.sh VERSION DIR}
DIR=${2:?usage: llama_sources.sh VERSION DIR}
PY=${PYTHON:-python3}

mkdir -p "$DIR"
"$PY" -m pip download --no-deps --no-binary :all: --no-cache-dir -q \
  "llama-cpp-python==$VERSION" -d "$DIR" >&2
tar -xzf "$DIR/llama_cpp_python-$VERSION.tar.gz" -C "$DIR"
src="$DIR/llama_cpp_python-$VERSION"
for patch in "$PATCHES"/*.patch; do
  # --forward and a failure on any rejected hunk: a version bump whose sources moved stops the
  # build here, rather than building llama.cpp without the fix.
  patch -p1 --forward --batch -d "$src/vendor/llama.cpp" <"$patch" >&2
done
echo "$src"
