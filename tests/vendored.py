"""The chat templates and vocabulary-only GGUF files the pinned llama-cpp-python sdist vendors.

``scripts/fetch_llama_models.sh`` extracts them once into a cache and ``make test`` names the
folder in ``LOCALBOT_LLAMA_MODELS``.  Each template is paired with its family's vocabulary
where one is vendored, else with ``llama-bpe`` (or ``qwen2`` for the Qwen-like families).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from ai_model.base import ModelError
from ai_model.templates import ChatTemplate

ROOT = Path(__file__).resolve().parent.parent

# Substrings of a template's file name -> its family's vendored vocabulary, first match wins.
FAMILIES = (
    ("phi-3", "phi-3"),
    ("qwen3.5", "qwen35"),
    ("gemma", "gemma-4"),
    ("cohere", "command-r"),
    ("command-r", "command-r"),
    ("deepseek-r1-distill-llama", "llama-bpe"),
    ("deepseek-r1-distill-qwen", "qwen2"),
    ("deepseek", "deepseek-llm"),
    ("qwen", "qwen2"),
    ("qwq", "qwen2"),
    ("smollm", "qwen2"),
    ("mimo", "qwen2"),
)


def models_dir() -> Path:
    """The folder of the vendored files; fails in CI (``make test`` fills it), else skips."""
    named = os.environ.get("LOCALBOT_LLAMA_MODELS", "")
    if named:
        folder = Path(named)
        if not (folder / ".complete").is_file():
            pytest.fail(f"LOCALBOT_LLAMA_MODELS names {folder}, which is not a complete extract")
        return folder
    try:
        out = subprocess.run(
            ["bash", str(ROOT / "scripts" / "fetch_llama_models.sh")],
            env={**os.environ, "PYTHON": sys.executable},
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        return Path(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, IndexError) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"no vendored llama.cpp models in CI: {exc}")
        pytest.skip(f"the vendored llama.cpp models cannot be extracted here: {exc}")


def vocab_of(template_name: str) -> str:
    lowered = template_name.lower()
    return next((vocab for key, vocab in FAMILIES if key in lowered), "llama-bpe")


@cache
def vocabulary(folder: Path, name: str) -> Any:
    """One ``Llama(vocab_only=True)`` per vocabulary for the whole session."""
    from llama_cpp import Llama

    return Llama(model_path=str(folder / f"ggml-vocab-{name}.gguf"), vocab_only=True, verbose=False)


@dataclass(frozen=True)
class Outcome:
    """What loading a template with its vocabulary gave: a format, or the refusal."""

    name: str
    vocab: str
    template: ChatTemplate | None
    reason: str


def load_template(folder: Path, path: Path, chat_template: str = "auto") -> Outcome:
    """The loader's own decision for ``path`` with its family's vocabulary."""
    from ai_model.jinja_format import template_for, token_text
    from ai_model.local import special_token_check

    name = path.name.removesuffix(".jinja")
    vocab = vocab_of(name)
    llm = vocabulary(folder, vocab)

    def piece(token: int) -> bytes:
        return bytes(llm.detokenize([token], special=True))

    try:
        template = template_for(
            chat_template,
            path.read_text(encoding="utf-8"),
            llm,
            bos=token_text(piece, llm.token_bos()),
            eos=token_text(piece, llm.token_eos()),
            adds_bos=tuple(llm.tokenize(b"", add_bos=True, special=True)),
            is_control=special_token_check(llm),
            model=f"{name} [{vocab}]",
        )
    except ModelError as exc:
        return Outcome(name, vocab, None, str(exc))
    return Outcome(name, vocab, template, "")
