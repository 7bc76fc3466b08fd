#!/usr/bin/env bash
# Print (and fill, once) the folder of the chat templates and vocabulary-only GGUF files that
# the sdist of the pinned llama-cpp-python vendors under vendor/llama.cpp/models/: 70 real chat
# templates (templates/*.jinja) and 19 ggml-vocab-*.gguf files.  The tests frame every template
# against its family's vocabulary.  Nothing but the package registry is reached; the folder is
# a project-owned cache keyed by the version.
set -euo pipefail

PY=${PYTHON:-python3}
VERSION=${LLAMA_CPP_VERSION:-0.3.36}
CACHE_ROOT=${LOCALBOT_MODELS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/localbot/llama-models}
DEST="$CACHE_ROOT/$VERSION"

if [ ! -f "$DEST/.complete" ]; then
  echo "extracting llama.cpp's test templates and vocabularies from llama-cpp-python $VERSION..." >&2
  mkdir -p "$CACHE_ROOT"
  work=$(mktemp -d "$CACHE_ROOT.tmp.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  "$PY" -m pip download --no-deps --no-binary :all: --no-cache-dir -q \
    "llama-cpp-python==$VERSION" -d "$work" >&2
  tar -xzf "$work"/llama_cpp_python-"$VERSION".tar.gz -C "$work" \
    --wildcards "*/vendor/llama.cpp/models/templates/*.jinja" \
    "*/vendor/llama.cpp/models/ggml-vocab-*.gguf"
  rm -rf "$DEST"
  mkdir -p "$DEST"
  cp "$work/llama_cpp_python-$VERSION/vendor/llama.cpp/models/templates/"*.jinja "$DEST/"
  cp "$work/llama_cpp_python-$VERSION/vendor/llama.cpp/models/"ggml-vocab-*.gguf "$DEST/"
  touch "$DEST/.complete"
fi
echo "$DEST"
