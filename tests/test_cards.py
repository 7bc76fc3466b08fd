"""Character cards: every version and container, round trips, and clear errors."""

from __future__ import annotations

import base64
import copy
import io
import json
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest

from chat.core import ConversationCore
from chat.roleplay.cards import blank_png, load_card, parse_card_bytes, write_png_card
from chat.roleplay.characters import CardError, character_from_card
from storage import Store
from tests.scripted import ScriptedModel
from tests.test_cli import run_bot

V1 = {
    "name": "Old Tom",
    "description": "{{char}} is a retired sailor.",
    "personality": "gruff",
    "scenario": "A harbour tavern.",
    "first_mes": "Ahoy.",
    "mes_example": "<START>\n{{user}}: Hi\n{{char}}: Ahoy.",
}
V2: dict[str, Any] = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {
        **V1,
        "name": "Seraphine",
        "creator_notes": "Made for testing. Never show this to the model.",
        "system_prompt": "{{original}} Write in second person.",
        "post_history_instructions": "Keep replies under 80 words.",
        "alternate_greetings": ["Oh, you again."],
        "tags": ["test"],
        "creator": "tests",
        "character_version": "7",
        "extensions": {"talkativeness": "0.9", "depth_prompt": {"prompt": "x", "depth": 4}},
        "some_future_field": {"kept": True},
    },
    "top_level_extra": [1, 2, 3],
}
V3: dict[str, Any] = {
    "spec": "chara_card_v3",
    "spec_version": "3.0",
    "data": {
        **V1,
        "name": "Captain Valeria Storm",
        "nickname": "Val",
        "creator_notes": "",
        "system_prompt": "",
        "post_history_instructions": "",
        "alternate_greetings": [],
        "group_only_greetings": ["Crew, gather round."],
        "tags": [],
        "creator": "",
        "character_version": "",
        "extensions": {},
        "assets": [
            {"type": "icon", "uri": "embeded://assets/icon.png", "name": "main", "ext": "png"}
        ],
        "creation_date": 1700000000,
    },
}


def png_with(chunks: dict[str, dict[str, Any]]) -> bytes:
    """A PNG written by hand: IHDR, the given tEXt card chunks, IDAT, IEND."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0))
    for keyword, card in chunks.items():
        payload = base64.b64encode(json.dumps(card).encode())
        out += chunk(b"tEXt", keyword.encode() + b"\x00" + payload)
    out += chunk(b"IDAT", zlib.compress(b"\x00" * 5)) + chunk(b"IEND", b"")
    return out


def charx_with(card: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("card.json", json.dumps(card))
        archive.writestr("assets/icon.png", blank_png())
    return buffer.getvalue()


def test_v1_v2_v3_json_cards_are_read() -> None:
    old = character_from_card(V1)
    assert (old.name, old.greeting, old.personality) == ("Old Tom", "Ahoy.", "gruff")
    two = character_from_card(V2)
    assert two.name == "Seraphine" and two.alternate_greetings == ("Oh, you again.",)
    assert two.talkativeness == 0.9 and two.system_prompt.startswith("{{original}}")
    three = character_from_card(V3)
    assert three.display_name == "Val" and three.greetings(group=True)[-1] == "Crew, gather round."
    assert three.greetings(group=False) == ("Ahoy.",)


def test_png_chara_and_ccv3_chunks_ccv3_wins() -> None:
    assert parse_card_bytes(png_with({"chara": V2}))["data"]["name"] == "Seraphine"
    both = png_with({"chara": V2, "ccv3": V3})
    assert parse_card_bytes(both)["data"]["name"] == "Captain Valeria Storm"


def test_charx_zip_card_json() -> None:
    assert parse_card_bytes(charx_with(V3), "val.charx")["data"]["nickname"] == "Val"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (png_with({}), "no chara/ccv3 chunk"),
        (png_with({})[:-20], "truncated"),
        (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 9) + b"tEXtchara\x00!!", "truncated"),
        (charx_with(V2).replace(b"card.json", b"cards.jsn"), "without card.json"),
        (b"PK\x03\x04garbage", "not a valid CHARX"),
        (b"not json at all", "not a character card"),
        (b"[1, 2]", "does not hold a JSON object"),
    ],
)
def test_broken_files_get_clear_errors(data: bytes, message: str) -> None:
    with pytest.raises(CardError, match=message):
        parse_card_bytes(data, "broken.png")


def test_cards_without_a_name_or_with_an_unknown_spec_are_refused() -> None:
    with pytest.raises(CardError, match="no character name"):
        character_from_card({"spec": "chara_card_v2", "data": {"description": "x"}})
    with pytest.raises(CardError, match="unsupported card spec"):
        character_from_card({"spec": "chara_card_v9", "data": {}})


def test_png_writer_replaces_old_chunks_and_round_trips(tmp_path: Path) -> None:
    original = png_with({"chara": V1})
    written = write_png_card(original, V3)
    assert written.count(b"tEXtchara") == 1 and written.count(b"tEXtccv3") == 1
    assert parse_card_bytes(written) == V3
    path = tmp_path / "val.png"
    path.write_bytes(written)
    assert load_card(path).display_name == "Val"


async def test_import_store_and_export_round_trips_unknown_fields(
    make_core: Any, store: Store, tmp_path: Path
) -> None:
    models = {"character": ScriptedModel(), "office": ScriptedModel()}
    core: ConversationCore = make_core(models)
    imported = await core.library.import_card(copy.deepcopy(V2))
    assert imported.character.name == "Seraphine" and not imported.replaced
    fresh: ConversationCore = make_core(models)  # as after a restart
    await fresh.library.load()
    stored = fresh.characters.find("seraphine")
    assert stored is not None
    from chat.roleplay.cards import export_card

    export_card(stored, tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text()) == V2
    export_card(stored, tmp_path / "out.png")
    assert parse_card_bytes((tmp_path / "out.png").read_bytes()) == V2


def test_cli_imports_exports_and_reports_broken_cards(tmp_path: Path) -> None:
    card = tmp_path / "val.charx"
    card.write_bytes(charx_with(V3))
    result = run_bot(["character", "import", str(card)], tmp_path)
    assert result.returncode == 0 and "imported Captain Valeria Storm" in result.stdout
    listed = run_bot(["character", "list"], tmp_path)
    assert "Captain Valeria Storm" in listed.stdout and "Mira" in listed.stdout
    out = tmp_path / "val.json"
    exported = run_bot(["character", "export", "captain valeria storm", str(out)], tmp_path)
    assert exported.returncode == 0 and json.loads(out.read_text()) == V3
    broken = tmp_path / "broken.png"
    broken.write_bytes(png_with({}))
    failed = run_bot(["character", "import", str(broken)], tmp_path)
    assert failed.returncode == 2 and "no chara/ccv3 chunk" in failed.stderr
    assert "Traceback" not in failed.stderr
