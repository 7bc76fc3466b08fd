"""Character card containers: JSON, PNG/APNG (``tEXt`` chunks ``chara``/``ccv3``) and CHARX zips."""

from __future__ import annotations

import base64
import binascii
import io
import json
import struct
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chat.limits import (
    MAX_CARD_BYTES,
    MAX_CARD_JSON_BYTES,
    MAX_ZIP_MEMBERS,
    clean_json,
    shorten,
)
from chat.roleplay.characters import CardError, Character, character_from_card

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ZIP_SIGNATURE = b"PK\x03\x04"
CARD_KEYWORDS = ("chara", "ccv3")
_MB = 1024 * 1024


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """The (type, data) chunks of a PNG file, checking lengths but not CRCs."""
    if not data.startswith(PNG_SIGNATURE):
        raise CardError("not a PNG file")
    chunks: list[tuple[bytes, bytes]] = []
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length:
            raise CardError("the PNG file is truncated")
        chunks.append((kind, body))
        pos += 12 + length
        if kind == b"IEND":
            break
    return chunks


def _png_card_texts(data: bytes) -> dict[str, str]:
    texts: dict[str, str] = {}
    for kind, body in _png_chunks(data):
        if kind != b"tEXt" or b"\x00" not in body:
            continue
        keyword, _, text = body.partition(b"\x00")
        name = keyword.decode("latin-1").lower()
        if name in CARD_KEYWORDS:
            texts[name] = text.decode("latin-1")
    return texts


def _decode_b64_json(text: str, where: str) -> dict[str, Any]:
    if len(text) > MAX_CARD_JSON_BYTES * 4 // 3 + 4:
        raise CardError(f"the {where} chunk is larger than {MAX_CARD_JSON_BYTES // _MB} MB")
    try:
        raw = base64.b64decode(text.strip(), validate=False)
        parsed = json.loads(raw.decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CardError(f"the {where} chunk is not base64-encoded card JSON") from exc
    if not isinstance(parsed, dict):
        raise CardError(f"the {where} chunk does not hold a JSON object")
    return parsed


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def write_png_card(png: bytes, card: Mapping[str, Any]) -> bytes:
    """``png`` with its card chunks replaced by ``card`` (``ccv3`` too for V3 cards)."""
    encoded = base64.b64encode(json.dumps(card, ensure_ascii=False).encode("utf-8"))
    new = [_chunk(b"tEXt", b"chara\x00" + encoded)]
    if card.get("spec") == "chara_card_v3":
        new.append(_chunk(b"tEXt", b"ccv3\x00" + encoded))
    out = [PNG_SIGNATURE]
    for kind, body in _png_chunks(png):
        if kind == b"tEXt" and body.split(b"\x00", 1)[0].lower() in (b"chara", b"ccv3"):
            continue  # old card data goes
        if kind == b"IEND":
            out.extend(new)
        out.append(_chunk(kind, body))
    return b"".join(out)


def blank_png() -> bytes:
    """A 1×1 transparent PNG, the canvas for exporting a card that came without an image."""
    header = struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0)
    pixels = zlib.compress(b"\x00\x00\x00\x00\x00")
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", pixels) + _chunk(b"IEND", b"")


def _read_capped(archive: zipfile.ZipFile, member: str, filename: str) -> bytes:
    """One zip member, decompressed in pieces and abandoned as soon as it passes the cap.

    The sizes in a zip's directory are the archive's own claim; only counting what actually
    comes out of the decompressor bounds the memory a "zip bomb" can take.
    """
    info = archive.getinfo(member)
    too_big = CardError(
        f"{filename}: {member} inflates to more than {MAX_CARD_JSON_BYTES // _MB} MB "
        "(a card's JSON is far smaller)"
    )
    if info.file_size > MAX_CARD_JSON_BYTES:
        raise too_big
    out = bytearray()
    with archive.open(info) as src:
        while chunk := src.read(64 * 1024):
            out += chunk
            if len(out) > MAX_CARD_JSON_BYTES:
                raise too_big
    return bytes(out)


def _charx_json(data: bytes, filename: str) -> bytes:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            if len(archive.infolist()) > MAX_ZIP_MEMBERS:
                raise CardError(f"{filename} holds more than {MAX_ZIP_MEMBERS} files")
            return _read_capped(archive, "card.json", filename)
    except CardError:
        raise
    except KeyError as exc:
        raise CardError(f"{filename} is a zip without card.json") from exc
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError) as exc:
        raise CardError(f"{filename} is not a valid CHARX/zip file") from exc
    except (OSError, zlib.error, ValueError) as exc:  # corrupt compressed data
        raise CardError(f"{filename} is a damaged CHARX/zip file") from exc


def parse_card_bytes(data: bytes, filename: str = "card") -> dict[str, Any]:
    """The card JSON inside ``data``, whatever the container, with every string cleaned."""
    filename = shorten(filename)
    if len(data) > MAX_CARD_BYTES:
        raise CardError(f"{filename} is larger than {MAX_CARD_BYTES // _MB} MB")
    if data.startswith(PNG_SIGNATURE):
        texts = _png_card_texts(data)
        if "ccv3" in texts:  # V3 wins when both are present
            parsed = _decode_b64_json(texts["ccv3"], "ccv3")
        elif "chara" in texts:
            parsed = _decode_b64_json(texts["chara"], "chara")
        else:
            raise CardError(f"{filename} is a PNG without character data (no chara/ccv3 chunk)")
        return _cleaned(parsed, filename)
    if data.startswith(ZIP_SIGNATURE):
        data = _charx_json(data, filename)
    if len(data) > MAX_CARD_JSON_BYTES:
        raise CardError(f"{filename}: the card JSON is larger than {MAX_CARD_JSON_BYTES // _MB} MB")
    try:
        parsed = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CardError(f"{filename} is not a character card (JSON, PNG or CHARX)") from exc
    if not isinstance(parsed, dict):
        raise CardError(f"{filename} does not hold a JSON object")
    return _cleaned(parsed, filename)


def _cleaned(parsed: dict[str, Any], filename: str) -> dict[str, Any]:
    try:
        return dict(clean_json(parsed))
    except RecursionError as exc:
        raise CardError(f"{filename}: the card JSON is nested too deeply") from exc


def load_card(path: str | Path) -> Character:
    """Read a card file of any container and version."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CardError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return character_from_card(parse_card_bytes(data, path.name))


def export_card(character: Character, path: str | Path) -> None:
    """Write the character's card (the imported JSON, unknown fields and all) as JSON or PNG."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        path.write_bytes(write_png_card(blank_png(), character.card))
    else:
        path.write_text(json.dumps(character.card, ensure_ascii=False, indent=2), encoding="utf-8")
