"""A file's bytes to pages of text, by what the bytes are (not what the name says).

Runs inside the reading process (:mod:`chat.documents.worker`), never in the bot's: a hostile
file may cost time or memory there, and that process has limits of its own.  Each refusal is a
:class:`Unreadable` whose message is the one line the poster gets.
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from chat.documents.limits import MIB, DocumentSettings

# What a name promises, by extension; other extensions are read as text when they are text.
KIND_OF_SUFFIX = {
    ".txt": "text",
    ".text": "text",
    ".log": "text",
    ".md": "markdown",
    ".markdown": "markdown",
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
    ".docx": "docx",
}
BINARY_SUFFIXES = {".pdf", ".docx"}
TEXT_KINDS = {"text", "markdown", "csv", "json", "code", "html"}
SUPPORTED = "text, Markdown, CSV, JSON, source code, HTML, PDF and DOCX"
MAX_ZIP_MEMBERS = 2000


class Unreadable(Exception):
    """The file cannot be read; the message says why, politely, in one line."""


@dataclass(frozen=True, slots=True)
class Pages:
    """A file's text: one entry per page (PDF) or one for the whole file."""

    kind: str
    pages: list[str]
    paged: bool  # the entries are real pages (their numbers are cited)


def _mb(n: int) -> str:
    return f"{n / MIB:.0f} MB" if n >= MIB else f"{n // 1024} KB"


def sniff(data: bytes) -> str:
    """What the bytes are: pdf, docx, zip (another zip), binary, html or text."""
    head = data[:1024]
    if head.startswith(b"%PDF-"):
        return "pdf"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                return "docx" if "word/document.xml" in z.namelist() else "zip"
        except zipfile.BadZipFile:
            return "binary"
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "text"  # UTF-16 with its byte-order mark
    if b"\x00" in head:
        return "binary"
    lowered = head.lstrip().lower()
    if lowered.startswith((b"<!doctype html", b"<html")):
        return "html"
    return "text"


def kind_of(name: str, data: bytes) -> str:
    """The kind to read ``data`` as; Unreadable when the content is not what the name says."""
    suffix = PurePosixPath(name.lower()).suffix
    claimed = KIND_OF_SUFFIX.get(suffix)
    found = sniff(data)
    if found in ("binary", "zip"):
        shown = "a PDF or DOCX" if suffix in BINARY_SUFFIXES else "text"
        raise Unreadable(
            f"{name} is not {shown} I can read (its content is binary). I read {SUPPORTED}."
        )
    if claimed in ("pdf", "docx") and found != claimed:
        content = found.upper() if found in ("pdf", "docx") else found
        raise Unreadable(
            f"{name} is not a {claimed.upper()} (its content is {content}), so I did not read "
            "it. Rename it or export it again."
        )
    if found in ("pdf", "docx"):
        if claimed is not None and claimed != found:
            raise Unreadable(
                f"{name} is a {found.upper()}, not what its name says, so I did not read it. "
                f"Rename it to .{found} and post it again."
            )
        return found
    if found == "html" or claimed == "html":
        return "html"
    return claimed or "code"


def _decode(data: bytes, name: str) -> str:
    for encoding in ("utf-8-sig", "utf-16") if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ():
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            pass
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        raise Unreadable(
            f"{name} is not text in an encoding I know (UTF-8 or Windows-1252)."
        ) from None


def _csv_text(raw: str) -> str:
    """Rows as ``header: value`` lines, so each row's values keep their column names."""
    try:
        dialect = csv.Sniffer().sniff(raw[:4096], delimiters=",;\t|")
        rows = list(csv.reader(io.StringIO(raw), dialect))
    except csv.Error:
        return raw
    if len(rows) < 2:
        return raw
    header = rows[0]
    lines = []
    for row in rows[1:]:
        cells = [
            f"{h.strip()}: {v.strip()}" for h, v in zip(header, row, strict=False) if v.strip()
        ]
        lines.append("; ".join(cells))
    return "\n".join(lines)


def _json_text(raw: str) -> str:
    try:
        return json.dumps(json.loads(raw), indent=1, ensure_ascii=False)
    except (ValueError, RecursionError):
        return raw


def _html_text(raw: str) -> str:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(raw, "html.parser")
    for tag in soup(["script", "style", "noscript", "template"]):
        tag.decompose()
    lines = (line.strip() for line in soup.get_text("\n").splitlines())
    return "\n".join(line for line in lines if line)


def _pdf_pages(data: bytes, name: str, limits: DocumentSettings) -> list[str]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            # Many PDFs are encrypted only to set permissions, with an empty password.
            try:
                opened = reader.decrypt("")
            except Exception as exc:  # pypdf raises several kinds for unknown ciphers
                raise Unreadable(f"{name} is encrypted, so I cannot read it.") from exc
            if not opened:
                raise Unreadable(
                    f"{name} is protected by a password, so I cannot read it. "
                    "Post a copy without the password."
                )
        # The page tree's own count first: a file claiming 100,000 pages is refused before
        # any of them is loaded.
        root: Any = reader.trailer["/Root"]
        declared = root["/Pages"].get("/Count", 0)
        if int(declared) > limits.max_pages:
            raise Unreadable(
                f"{name} has {int(declared):,} pages; I read at most {limits.max_pages:,}."
            )
        pages: list[str] = []
        total = 0
        for number, page in enumerate(reader.pages, start=1):
            if number > limits.max_pages:
                raise Unreadable(f"{name} has more than {limits.max_pages:,} pages.")
            found = page.extract_text() or ""
            total += len(found)
            if total > limits.max_chars:
                raise Unreadable(
                    f"{name} has more than {limits.max_chars:,} characters of text; "
                    "that is more than I keep for one file."
                )
            pages.append(found)
        return pages
    except Unreadable:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        raise Unreadable(f"{name} looks damaged: I could not read it as a PDF.") from exc


def _docx_text(data: bytes, name: str, limits: DocumentSettings) -> str:
    # A DOCX is a zip: what it inflates to is checked from the zip's directory before any
    # member is inflated (a zip bomb stops here).
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            members = z.infolist()
            if len(members) > MAX_ZIP_MEMBERS:
                raise Unreadable(f"{name} holds {len(members):,} files inside; that is too many.")
            inflated = sum(m.file_size for m in members)
            if inflated > limits.max_unzipped_bytes:
                raise Unreadable(
                    f"{name} would unpack to {_mb(inflated)}; I unpack at most "
                    f"{_mb(limits.max_unzipped_bytes)}."
                )
    except zipfile.BadZipFile as exc:
        raise Unreadable(f"{name} looks damaged: I could not open it as a DOCX.") from exc
    import docx

    try:
        document = docx.Document(io.BytesIO(data))
    except Exception as exc:  # python-docx raises KeyError, ValueError, lxml errors ...
        raise Unreadable(f"{name} looks damaged: I could not read it as a DOCX.") from exc
    parts = [p.text for p in document.paragraphs]
    for table in document.tables:
        for row in table.rows:
            parts.append(" | ".join(cell.text.strip() for cell in row.cells))
    return "\n".join(p for p in parts if p.strip())


def read(name: str, data: bytes, limits: DocumentSettings) -> Pages:
    """The text of file ``name``; Unreadable (with the poster's one line) when it cannot be."""
    if len(data) > limits.max_bytes:
        raise Unreadable(f"{name} is {_mb(len(data))}; I read files up to {_mb(limits.max_bytes)}.")
    if not data.strip():
        raise Unreadable(f"{name} is empty.")
    kind = kind_of(name, data)
    if kind == "pdf":
        pages = _pdf_pages(data, name, limits)
        if not any(p.strip() for p in pages):
            raise Unreadable(
                f"{name} has no text I can read (a scan? I do not read images of text)."
            )
        return Pages(kind, pages, paged=True)
    if kind == "docx":
        body = _docx_text(data, name, limits)
    else:
        raw = _decode(data, name)
        body = {"csv": _csv_text, "json": _json_text, "html": _html_text}.get(kind, str)(raw)
    if len(body) > limits.max_chars:
        raise Unreadable(
            f"{name} has more than {limits.max_chars:,} characters of text; "
            "that is more than I keep for one file."
        )
    if not body.strip():
        raise Unreadable(f"{name} has no text in it.")
    return Pages(kind, [body], paged=False)
