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

from bot.characters import CardError, Character, character_from_card

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ZIP_SIGNATURE = b"PK\x03\x04"
CARD_KEYWORDS = ("chara", "ccv3")
MAX_CARD_BYTES = 32 * 1024 * 1024


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
    try:
        raw = base64.b64decode(text.strip(), validate=False)
        parsed = json.loads(raw.decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
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


def parse_card_bytes(data: bytes, filename: str = "card") -> dict[str, Any]:
    """The card JSON inside ``data``, whatever the container."""
    if len(data) > MAX_CARD_BYTES:
        raise CardError(f"{filename} is larger than {MAX_CARD_BYTES // (1024 * 1024)} MB")
    if data.startswith(PNG_SIGNATURE):
        texts = _png_card_texts(data)
        if "ccv3" in texts:  # V3 wins when both are present
            return _decode_b64_json(texts["ccv3"], "ccv3")
        if "chara" in texts:
            return _decode_b64_json(texts["chara"], "chara")
        raise CardError(f"{filename} is a PNG without character data (no chara/ccv3 chunk)")
    if data.startswith(ZIP_SIGNATURE):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                raw = archive.read("card.json")
        except KeyError as exc:
            raise CardError(f"{filename} is a zip without card.json") from exc
        except zipfile.BadZipFile as exc:
            raise CardError(f"{filename} is not a valid CHARX/zip file") from exc
        data = raw
    try:
        parsed = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CardError(f"{filename} is not a character card (JSON, PNG or CHARX)") from exc
    if not isinstance(parsed, dict):
        raise CardError(f"{filename} does not hold a JSON object")
    return parsed


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
