"""Safety bounds one by one: text hygiene, isolated writes, fair shares, card and lore limits."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

from ai_model.templates import CHATML, LLAMA3, TEMPLATES, plain_text_leaks
from chat.answers import SLOW_STORAGE
from chat.core import ConversationCore
from chat.fairness import LruDict, RateLimiter, Verdict
from chat.limits import MAX_AUTHOR_NAME_CHARS, MAX_FIELD_CHARS, clean_text
from chat.messages import IncomingMessage, OutgoingReply, ReplyKind
from chat.queues import QUEUE_FULL, USER_BUSY
from chat.roleplay.cards import parse_card_bytes
from chat.roleplay.characters import CardError, card_from_fields, character_from_card
from chat.roleplay.lorebook import Lorebook, LoreError, check_book
from storage import Store
from tests.hostile_corpus import zip_bomb
from tests.scripted import ByteTokenizer, ScriptedModel
from tests.test_core import text_of

ROOT = Path(__file__).resolve().parent.parent


def tg(user: str, text: str, chat: str = "telegram:-1", name: str = "Ann") -> IncomingMessage:
    return IncomingMessage("telegram", chat, user, name, text, mentions_bot=True)


async def finals(core: ConversationCore, msg: IncomingMessage) -> list[OutgoingReply]:
    return [r async for r in core.answers.respond(msg) if r.final]


# -- text at the boundary ----------------------------------------------------------------------


def test_invalid_code_points_become_replacement_characters_and_the_rest_is_kept() -> None:
    rtl_and_zero_width = "\u202eevil\u200b\u200d\ufeff"
    assert clean_text("a\ud800b\udfffc\x00d") == "a\ufffdb\ufffdc\ufffdd"
    assert clean_text(rtl_and_zero_width) == rtl_and_zero_width
    msg = IncomingMessage("telegram", "telegram:1", "1\ud800", "N" * 10_000 + "\udc00", "x\ud800")
    assert msg.text == "x\ufffd" and msg.author_id == "1\ufffd"
    assert len(msg.author_name) == MAX_AUTHOR_NAME_CHARS
    msg.text.encode("utf-8")  # storable and encodable


async def test_a_row_that_cannot_be_stored_fails_alone(store: Store) -> None:
    conv = await store.conversations.get_or_create("telegram", "telegram:1")
    good = [store.messages.add(conv.id, "user", f"message {i}") for i in range(16)]
    # Bypasses the adapter boundary on purpose: the writer itself must isolate the bad row.
    bad = store.messages.add(conv.id, "user", "lone \ud800 surrogate")
    results = await asyncio.gather(*good, bad, return_exceptions=True)
    assert all(isinstance(r, int) for r in results[:16])
    assert isinstance(results[16], UnicodeEncodeError)
    assert await store.messages.count(conv.id) == 16


async def test_a_storage_failure_gets_the_sender_a_polite_notice(
    make_core: Any, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    core: ConversationCore = make_core({"office": ScriptedModel(["Hi."])})

    async def broken(*_a: Any, **_k: Any) -> int:
        raise OSError("disk full")

    monkeypatch.setattr(store.messages, "add", broken)
    replies = await finals(core, tg("1", "hello"))
    assert [r.kind for r in replies] == [ReplyKind.NOTICE]
    assert "could not save your message" in replies[0].text


# -- fair shares -------------------------------------------------------------------------------


def test_rate_limit_tells_once_then_drops_until_the_minute_passes() -> None:
    now = [0.0]
    limiter = RateLimiter(3, clock=lambda: now[0])
    assert [limiter.check("a") for _ in range(3)] == [Verdict.ALLOW] * 3
    assert limiter.check("a") is Verdict.NOTICE
    assert limiter.check("a") is Verdict.DROP
    assert limiter.check("b") is Verdict.ALLOW  # someone else is not affected
    now[0] = 61.0
    assert limiter.check("a") is Verdict.ALLOW


def test_lru_dict_forgets_the_oldest_but_keeps_busy_entries() -> None:
    lru: LruDict[int, str] = LruDict(3, keep=lambda v: v == "busy")
    lru[0] = "busy"
    for i in range(1, 10):
        lru[i] = "idle"
    assert list(lru) == [0, 8, 9]  # the busy entry stays; idle ones go oldest first


async def test_a_flooding_user_costs_other_users_nothing(make_core: Any, store: Store) -> None:
    model = ScriptedModel(["Fine."])
    core: ConversationCore = make_core({"office": model}, rate_limit=5)
    flood = [await finals(core, tg("66", f"spam {i}", "telegram:-9")) for i in range(12)]
    answers = [r for replies in flood for r in replies if r.kind is ReplyKind.ANSWER]
    notices = [r for replies in flood for r in replies if r.kind is ReplyKind.NOTICE]
    assert len(answers) == 5 and len(notices) == 1 and "faster than" in notices[0].text
    other = await finals(core, tg("77", "hello", "telegram:-9", name="Bea"))
    assert other[-1].kind is ReplyKind.ANSWER
    conv = await store.conversations.get_or_create("telegram", "telegram:-9")
    # The 7 messages over the limit were not stored; all answers and Bea's message were.
    assert await store.messages.count(conv.id) == 5 + 5 + 1 + 1


async def test_queue_bounds_per_conversation_and_per_user(make_core: Any, store: Store) -> None:
    model = ScriptedModel(["Slow answer."], delay=0.05)
    core: ConversationCore = make_core({"office": model}, max_queued=3, max_pending_per_user=1)
    # One user: the second message while the first is pending is stored, not queued.
    both = await asyncio.gather(
        finals(core, tg("1", "first", "telegram:-5")),
        finals(core, tg("1", "second", "telegram:-5")),
    )
    kinds = sorted(r.kind.value for replies in both for r in replies)
    assert kinds == ["answer", "notice"]
    assert any(r.text == USER_BUSY for replies in both for r in replies)
    # Many users in one channel: past three queued answers the rest get a notice.
    many = await asyncio.gather(
        *(finals(core, tg(str(10 + i), f"hi {i}", "telegram:-6", f"U{i}")) for i in range(6))
    )
    texts = [r.text for replies in many for r in replies]
    assert texts.count(QUEUE_FULL) == 3 and texts.count("Slow answer.") == 3
    conv = await store.conversations.get_or_create("telegram", "telegram:-6")
    assert await store.messages.count(conv.id) == 6 + 3  # every message is kept


async def test_per_conversation_maps_stay_bounded_under_a_flood(make_core: Any) -> None:
    core: ConversationCore = make_core({"office": ScriptedModel(["ok"])})
    core.conversations.capacity = core.queues.capacity = 20
    core.history.max_conversations = 20
    for i in range(120):
        await finals(core, tg(str(i), "hello", f"telegram:{1000 + i}"))
    assert len(core.conversations) <= 20 and len(core.queues) <= 20
    assert len(core.history._cache) <= 20


# -- cards and lorebooks -----------------------------------------------------------------------


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_DEFLATED])
def test_a_charx_bomb_is_refused_with_little_memory(tmp_path: Path, method: int) -> None:
    bomb = tmp_path / "bomb.charx"
    inflated = (1 << 30) if method == zipfile.ZIP_BZIP2 else (128 << 20)
    bomb.write_bytes(zip_bomb(inflated, method))
    if method == zipfile.ZIP_BZIP2:
        assert bomb.stat().st_size < 2048  # a 1 KB zip that inflates to 1 GB
    out = _peak_growth(bomb, "parse_card_bytes(data, 'bomb.charx')")
    assert "refused:" in out and "inflates to more than" in out, out
    growth_kb = int(out.split("growth_kb")[1])
    print(f"charx bomb ({inflated >> 20} MB inflated): peak RSS growth {growth_kb} KB")
    assert growth_kb < 50 * 1024
    if method == zipfile.ZIP_DEFLATED:
        # The control: the same measurement sees a plain, uncapped read of the same member.
        out = _peak_growth(bomb, "zipfile.ZipFile(io.BytesIO(data)).read('card.json')")
        assert int(out.split("growth_kb")[1]) > 100 * 1024, out


def _peak_growth(bomb: Path, call: str) -> str:
    """Run ``call`` on the bytes of ``bomb`` in a fresh process; report its peak RSS growth.

    The peak is VmHWM, the high-water mark of the process's own memory map.  (``ru_maxrss``
    would not do: a child starts from its parent's RSS at fork, and exec keeps it.)
    """
    script = textwrap.dedent(
        f"""
        import io, re, zipfile
        from chat.roleplay.cards import parse_card_bytes
        from chat.roleplay.characters import CardError
        def peak_kb():
            status = open("/proc/self/status").read()
            return int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1))
        data = open({str(bomb)!r}, "rb").read()
        before = peak_kb()
        try:
            {call}
        except CardError as exc:
            print("refused:", exc)
        print("growth_kb", peak_kb() - before)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_card_field_caps_name_the_field() -> None:
    huge = card_from_fields("Big", description="x" * (MAX_FIELD_CHARS + 1))
    with pytest.raises(CardError, match="description"):
        _check(huge)
    with pytest.raises(CardError, match="name"):
        _check(card_from_fields("N" * 500))
    greetings = card_from_fields("G", alternate_greetings=["hi"] * 500)
    with pytest.raises(CardError, match="greetings"):
        _check(greetings)
    deep = b'{"a":' * 5000 + b"1" + b"}" * 5000
    with pytest.raises(CardError, match=r"not a character card|nested"):
        parse_card_bytes(deep, "deep.json")


def _check(card: dict[str, Any]) -> None:
    from chat.roleplay.characters import check_card

    check_card(card)


def test_catastrophic_regex_keys_are_refused_at_import() -> None:
    evil = {"entries": [{"keys": ["(a+)+$"], "content": "x", "use_regex": True}]}
    with pytest.raises(LoreError, match="too slow"):
        check_book(evil)
    with pytest.raises(LoreError, match="invalid"):
        check_book({"entries": [{"keys": ["(unclosed"], "content": "x", "use_regex": True}]})
    check_book({"entries": [{"keys": ["dragons?"], "content": "x", "use_regex": True}]})


async def test_a_catastrophic_key_adds_under_100_ms_to_a_message(make_core: Any) -> None:
    # A key that passes the import probes but explodes on this conversation's text.
    key = r"(x+x+)+y"
    book = Lorebook.from_json({"entries": [{"keys": [key], "content": "boom", "use_regex": True}]})
    safe = Lorebook.from_json({"entries": [{"keys": ["z"], "content": "calm", "use_regex": True}]})
    model = ScriptedModel(["Mm."])
    core: ConversationCore = make_core({"character": model, "office": model})
    key_of = "telegram:-42"
    await core.actions.set_mode("telegram", key_of, "roleplay")
    core.world_books.update({"evil": book, "safe": safe})
    text = "x" * 4000
    timings = {}
    for name in ("safe", "evil"):
        await core.actions.attach_world_book("telegram", key_of, name)
        start = time.perf_counter()
        await finals(core, tg("1", text, key_of))
        timings[name] = time.perf_counter() - start
    print(f"message with a safe key {timings['safe']:.3f}s, catastrophic {timings['evil']:.3f}s")
    assert timings["evil"] - timings["safe"] < 0.1
    assert "boom" not in text_of(model.prompts[-1])


async def test_imports_need_room_in_the_window_and_never_replace_shipped(
    make_core: Any, smollm: Any
) -> None:
    core: ConversationCore = make_core({"character": smollm, "office": smollm})
    with pytest.raises(CardError, match="ships with the bot"):
        await core.library.import_card(card_from_fields("Mira", description="An impostor."))
    assert "impostor" not in core.characters.get("Mira").description.lower()
    words = " ".join(f"lore{i}" for i in range(2500))  # about 5,000 tokens
    with pytest.raises(CardError, match="largest field is description"):
        await core.library.import_card(card_from_fields("Tome", description=words))
    first = await core.library.import_card(card_from_fields("Wren", description="A scout."))
    assert not first.replaced
    with pytest.raises(CardError, match="already exists"):
        await core.library.import_card(card_from_fields("Wren", description="Another."))
    again = await core.library.import_card(
        card_from_fields("Wren", description="Another."), replace=True
    )
    assert again.replaced and core.characters.get("Wren").description == "Another."


async def test_an_oversized_character_does_not_cost_users_their_messages(
    make_core: Any, store: Store
) -> None:
    # Configured (not imported) characters are not checked at import: the prompt must cope.
    model = ScriptedModel(["Hm."], n_ctx=1024)
    big = character_from_card(card_from_fields("Colossus", description="w" * 3000))
    core: ConversationCore = make_core(
        {"character": model, "office": model}, characters={"colossus": big}
    )
    key = "telegram:-77"
    await core.actions.set_mode("telegram", key, "roleplay")
    await core.actions.set_character("telegram", key, "Colossus")
    replies = await finals(core, tg("1", "Hello there", key))
    assert replies[-1].kind is ReplyKind.NOTICE and "character set-up" in replies[-1].text
    conv = await store.conversations.get_or_create("telegram", key)
    kept = [m for m in await store.messages.history(conv.id) if m.text == "Hello there"]
    assert kept and kept[0].in_context  # still part of the conversation


# -- control tokens and state files -------------------------------------------------------------


def test_template_markers_that_stay_special_in_plain_text_are_detected(smollm: Any) -> None:
    from ai_model.local import special_token_check

    llm = smollm.llama
    for template in TEMPLATES.values():
        assert plain_text_leaks(template, llm, special_token_check(llm)) == []

    class UserDefined(ByteTokenizer):
        """Matches ``<|im_start|>`` even in plain text, as llama.cpp does user-defined tokens."""

        def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
            return super().tokenize(text, add_bos, special=True)

    leaky = UserDefined(["<|im_start|>"])
    leaks = plain_text_leaks(CHATML, leaky, lambda i: i >= 256)
    assert "<|im_start|>" in leaks
    assert plain_text_leaks(LLAMA3, leaky, lambda i: i >= 256) == []


def test_saved_states_stay_within_each_models_disk_budget(tmp_path: Path) -> None:
    """Each model keeps its own files under its budget at every write, the least recently
    written going first; a file is gone once read; two models in one folder keep theirs."""
    from ai_model.parking import SavedState, StateFiles

    def state(n: int) -> SavedState:
        return SavedState(tuple(range(n)), bytearray(b"x" * 1000))

    one = StateFiles(tmp_path, "model-one", 3500)
    two = StateFiles(tmp_path, "model-two", 3500)
    assert two.write("other", state(4))
    for i in range(6):
        assert one.write(f"k{i}", state(4))
        assert one.used <= 3500
    assert [one.read(f"k{i}", 10) is None for i in range(6)] == [True] * 3 + [False] * 3
    assert one.used == 0  # read states live in a sequence again: their files are gone
    assert two.read("other", 10) is not None  # the other model's file was never pruned
    assert not StateFiles(tmp_path, "model-one", 500).write("big", state(4))  # over budget
    assert not list(tmp_path.glob("*.state")) and not list(tmp_path.glob("*.tmp"))
    again = StateFiles(tmp_path, "model-one", 2500)  # a later run finds what is left
    for i in range(2):
        assert one.write(f"k{i}", state(4))
    assert again.write("k9", state(4)) and again.used <= 2500
    assert again.read("k0", 10) is None and again.read("k1", 10) is not None


def test_example_settings_document_the_safety_settings() -> None:
    import tomllib

    raw = tomllib.loads((ROOT / "config" / "example.toml").read_text())
    for key in ("owner_ids", "rate_limit", "max_queued", "max_pending_per_user"):
        assert key in raw["bot"]


async def test_a_message_longer_than_the_window_is_tokenized_whole_once(
    make_core: Any, store: Store
) -> None:
    class Counting(ByteTokenizer):
        def __init__(self) -> None:
            super().__init__(CHATML.stop)
            self.long_calls = 0

        def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
            self.long_calls += len(text) >= 100_000
            return super().tokenize(text, add_bos, special)

    tokenizer = Counting()
    model = ScriptedModel(["Sure."], tokenizer=tokenizer)
    core: ConversationCore = make_core({"office": model})
    replies = await finals(core, tg("1", "z" * 100_000, "telegram:-3"))
    assert "too long" in replies[-1].text and replies[-1].kind is ReplyKind.NOTICE
    for text in ("And now a short one.", "Another."):
        assert (await finals(core, tg("1", text, "telegram:-3")))[-1].text == "Sure."
    assert tokenizer.long_calls == 1
    conv = await store.conversations.get_or_create("telegram", "telegram:-3")
    assert await store.messages.count(conv.id) == 3 + 1 + 2  # all stored, and the notice


async def test_a_database_locked_for_10_s_delays_messages_but_loses_none(
    make_core: Any, store: Store, settings: Any
) -> None:
    import sqlite3
    import threading

    path = settings.database_url.split("///", 1)[1]
    locked, release = threading.Event(), threading.Event()

    def hold_the_lock() -> None:
        with sqlite3.connect(path, isolation_level=None) as other:
            other.execute("BEGIN IMMEDIATE")  # another process writing, say a backup job
            locked.set()
            release.wait(10)
            other.execute("COMMIT")

    model = ScriptedModel(["Answered."])
    core: ConversationCore = make_core({"office": model})
    for i in range(3):  # the conversations exist already: only the messages wait
        await core.conversations.get("telegram", f"telegram:-{60 + i}")
    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    await asyncio.to_thread(locked.wait)
    started = time.monotonic()
    results = await asyncio.gather(
        *(finals(core, tg(str(i), f"hello {i}", f"telegram:-{60 + i}")) for i in range(3))
    )
    holder.join()
    assert time.monotonic() - started >= 9.5  # they really waited for the lock
    for replies in results:
        assert [r.text for r in replies] == [SLOW_STORAGE, "Answered."]
    for i in range(3):
        conv = await store.conversations.get_or_create("telegram", f"telegram:-{60 + i}")
        assert [m.text for m in await store.messages.history(conv.id)] == [
            f"hello {i}",
            "Answered.",
        ]


async def test_a_refused_message_gets_one_notice_not_one_per_character(make_core: Any) -> None:
    model = ScriptedModel(["Hm."])
    core: ConversationCore = make_core({"character": model, "office": model})
    key = "telegram:-88"
    await core.actions.set_mode("telegram", key, "roleplay")
    await core.actions.set_cast("telegram", key, ["Mira", "Captain Reyes"])
    # The scene's first message names both characters: both would speak, in turn.
    replies = await finals(core, tg("1", "Mira, Captain Reyes: " + "z" * 40_000, key))
    assert [r.kind for r in replies] == [ReplyKind.ANSWER, ReplyKind.NOTICE]  # greeting, refusal
    assert "too long" in replies[-1].text
    assert model.prompts == []  # no character answered the refused message
