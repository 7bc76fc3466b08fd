"""The ``[documents]`` settings: how much one file may cost to read, and how much a
conversation may hold and a prompt may take."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class DocumentSettings:
    """What documents may cost.  Every bound is named in the refusal that it causes."""

    enabled: bool = True
    # Share of the office model's window the retrieved excerpts may take.
    budget: float = 0.25
    # Bounds on reading one file (checked before download, then in the reading process).
    max_file_mb: float = 20.0  # Telegram's getFile serves 20 MB at most
    max_pages: int = 500
    max_chars: int = 2_000_000
    max_seconds: float = 30.0
    max_unzipped_mb: float = 200.0  # what a DOCX (a zip) may inflate to
    # Bounds on what one conversation holds.
    max_documents: int = 50
    max_chunks: int = 20_000
    # Chunks, in the office model's tokens.
    chunk_tokens: int = 256
    chunk_overlap: int = 32
    # How many chunks a search returns before the budget decides what is placed.
    top_k: int = 4

    def validate(self) -> None:
        """Raise ValueError naming the key of a value out of range."""
        if not 0 < self.budget <= 0.5:
            raise ValueError("budget must be a share of the window above 0 and at most 0.5")
        for name in ("max_file_mb", "max_seconds", "max_unzipped_mb"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be above 0")
        for name in ("max_pages", "max_chars", "max_documents", "max_chunks", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 32 <= self.chunk_tokens <= 2048:
            raise ValueError("chunk_tokens must be from 32 to 2048")
        if not 0 <= self.chunk_overlap < self.chunk_tokens // 2:
            raise ValueError("chunk_overlap must be from 0 to half of chunk_tokens")

    @property
    def max_bytes(self) -> int:
        return int(self.max_file_mb * MIB)

    @property
    def max_unzipped_bytes(self) -> int:
        return int(self.max_unzipped_mb * MIB)
