"""Files to post in the document tests: real PDFs (fpdf2) and DOCX files (python-docx), and the
hostile set.  The retrieval corpus is the bench's (:mod:`bot.bench.corpus`)."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence

import docx
from fpdf import FPDF

from chat.messages import Attachment


def pdf(pages: Sequence[str], password: str | None = None) -> bytes:
    doc = FPDF()
    if password is not None:
        doc.set_encryption(owner_password="owner-" + password, user_password=password)
    doc.set_font("helvetica", size=11)
    for text in pages:
        doc.add_page()
        doc.multi_cell(0, 6, text)
    return bytes(doc.output())


def docx_file(paragraphs: Sequence[str]) -> bytes:
    document = docx.Document()
    for text in paragraphs:
        document.add_paragraph(text)
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def zip_bomb_docx(inflated_mb: int = 400) -> bytes:
    """A real DOCX with one member that inflates to ``inflated_mb`` MB of zeros."""
    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(docx_file(["Looks harmless."]))) as src,
        zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst,
    ):
        for item in src.infolist():
            dst.writestr(item, src.read(item))
        with dst.open("word/media/padding.bin", "w") as padding:
            block = bytes(1024 * 1024)
            for _ in range(inflated_mb):
                padding.write(block)
    return out.getvalue()


def many_pages_pdf(pages: int = 100_000, declared: int | None = None) -> bytes:
    """A hand-built PDF whose page tree has ``pages`` empty pages (and says ``declared``)."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"",  # the page tree, below
    ]
    kids = []
    for i in range(pages):
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>")
        kids.append(f"{i + 3} 0 R".encode())
    count = pages if declared is None else declared
    objects[1] = b"<< /Type /Pages /Kids [" + b" ".join(kids) + b"] /Count %d >>" % count
    body = io.BytesIO()
    body.write(b"%PDF-1.4\n")
    offsets = []
    for number, obj in enumerate(objects, start=1):
        offsets.append(body.tell())
        body.write(b"%d 0 obj\n" % number + obj + b"\nendobj\n")
    xref = body.tell()
    body.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        body.write(b"%010d 00000 n \n" % offset)
    body.write(
        b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    )
    return body.getvalue()


def attachment(name: str, data: bytes, size: int | None = None) -> Attachment:
    async def read() -> bytes:
        return data

    return Attachment(name, len(data) if size is None else size, read)
