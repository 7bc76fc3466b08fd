"""The Telegram adapter end to end: real python-telegram-bot against a local Bot API server."""

from __future__ import annotations

import asyncio
import html
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import text

from adapters.streaming import StreamLimits
from adapters.telegram import TelegramAdapter
from chat.commands import TEXT_ONLY
from chat.core import ConversationCore
from chat.reminders.limits import ReminderSettings
from chat.settings import PlatformSettings, Settings
from storage import Store
from tests.conftest import FixedModels
from tests.fake_telegram import BOT, FakeTelegram
from tests.scripted import ScriptedModel
from tests.test_core import text_of
from tests.waiting import stored_replies

DM = 501  # a private chat's id is the user's id
GROUP = -100200
ANN, BOB = 501, 502


Harness = tuple[FakeTelegram, ScriptedModel, ScriptedModel, ConversationCore]


@pytest.fixture
async def bot(
    telegram: FakeTelegram, settings: Settings, store: Store
) -> AsyncIterator[Callable[..., Any]]:
    running: list[tuple[TelegramAdapter, asyncio.Task[None]]] = []

    async def start(
        office_script: Any = ("Here you go.",),
        character_script: Any = ("*Mira nods.*",),
        **changes: Any,
    ) -> Harness:
        office = ScriptedModel(office_script)
        character = ScriptedModel(character_script)
        # Ann is the bot's owner: she may import characters (in any chat).
        owned = replace(settings, owner_ids=frozenset({f"telegram:{ANN}"}), **changes)
        core = ConversationCore(
            owned, store, FixedModels({"office": office, "character": character})
        )
        platform = PlatformSettings(token="123:TEST", api_base_url=telegram.base_url)
        adapter = TelegramAdapter(
            core, platform, poll_timeout=1, limits=StreamLimits(4096, 0.05, 10)
        )
        task = asyncio.create_task(adapter.start())
        running.append((adapter, task))
        await telegram.wait_for(lambda: "setMyCommands" in telegram.methods())
        return telegram, office, character, core

    start.running = running  # type: ignore[attr-defined]  # for tests that stop one
    yield start
    for adapter, task in running:
        await adapter.stop()
        await asyncio.wait_for(task, 10)


async def reply_state(store: Store, message_id: int) -> str | None:
    async with store.engine.connect() as conn:
        found = await conn.execute(
            text("SELECT reply_state FROM messages WHERE id = :id"), {"id": message_id}
        )
        return found.scalar_one_or_none()


def last_text(server: FakeTelegram, chat_id: int) -> str:
    return server.bot_messages(chat_id)[-1].text


async def wait_reply_count(server: FakeTelegram, chat_id: int, count: int) -> None:
    await server.wait_for(lambda: len(server.bot_messages(chat_id)) >= count)


async def test_commands_menu_is_registered(bot: Callable[..., Any]) -> None:
    server, _, _, core = await bot()
    assert [c["command"] for c in server.commands] == [c.name for c in core.commands.on("telegram")]


async def test_dm_exchange_streams_with_edits_and_typing(bot: Callable[..., Any]) -> None:
    long_answer = " ".join(f"word{i}" for i in range(60)) + " **done**"
    server, office, *_ = await bot(office_script=[long_answer])
    office.delay = 0.01
    server.push(DM, ANN, "Ann", "Write me sixty words please")
    await server.wait_for(
        lambda: server.bot_messages(DM) and server.bot_messages(DM)[-1].parse_mode == "HTML"
    )
    message = server.bot_messages(DM)[-1]
    assert message.text.endswith("<b>done</b>")  # the final edit is formatted
    assert len(message.edits) >= 2  # streamed: several edits before the final one
    assert "sendChatAction" in server.methods()
    assert message.reply_to is None  # DMs need no reply threading
    # One human in a DM: the turn carries no name for the model to imitate.
    assert "user\nWrite me sixty words please" in text_of(office.prompts[-1])


async def test_start_help_reset_and_regenerate_in_a_dm(bot: Callable[..., Any]) -> None:
    server, office, *_ = await bot(office_script=["First answer.", "Second answer."])
    server.push(DM, ANN, "Ann", "/start")
    await wait_reply_count(server, DM, 1)
    assert "office assistant" in last_text(server, DM)
    server.push(DM, ANN, "Ann", "/help")
    await wait_reply_count(server, DM, 2)
    assert "/mode" in last_text(server, DM) and "/regenerate" in last_text(server, DM)
    server.push(DM, ANN, "Ann", "Tell me something")
    await server.wait_for(lambda: last_text(server, DM) == "First answer.")
    server.push(DM, ANN, "Ann", "/regenerate")
    await server.wait_for(lambda: last_text(server, DM) == "Second answer.")
    assert text_of(office.prompts[1]).count("Tell me something") == 1
    assert "First answer." not in text_of(office.prompts[1])  # replaced, not stacked
    server.push(DM, ANN, "Ann", "/reset")
    await server.wait_for(lambda: "fresh conversation" in last_text(server, DM))


async def test_group_mode_and_character_need_an_admin(bot: Callable[..., Any]) -> None:
    server, _, _, core = await bot()
    server.push(GROUP, BOB, "Bob", "/mode roleplay")
    await wait_reply_count(server, GROUP, 1)
    assert "Only chat administrators can change the mode" in last_text(server, GROUP)
    server.push(GROUP, BOB, "Bob", "/character Mira")
    await wait_reply_count(server, GROUP, 2)
    assert "Only chat administrators" in last_text(server, GROUP)
    server.admins.add((GROUP, ANN))
    server.push(GROUP, ANN, "Ann", "/mode roleplay")
    await wait_reply_count(server, GROUP, 4)
    texts = [m.text for m in server.bot_messages(GROUP)]
    assert "Mode set to roleplay" in texts[2]
    # The scene opens with the character's greeting, its alternatives offered as swipes.
    assert "Welcome to the Lantern Inn" in texts[3] and "(1/3" in texts[3]
    server.push(GROUP, ANN, "Ann", "/character Nobody")
    await wait_reply_count(server, GROUP, 5)
    assert "don't know a character called Nobody" in last_text(server, GROUP)
    server.push(GROUP, ANN, "Ann", "/character")
    await wait_reply_count(server, GROUP, 6)
    assert "Character here: Mira" in last_text(server, GROUP)
    assert "Captain Reyes" in last_text(server, GROUP)  # shipped characters are listed
    server.push(GROUP, BOB, "Bob", "/swipe")
    await wait_reply_count(server, GROUP, 7)
    assert "(2/3" in last_text(server, GROUP) and "Stew's hot tonight" in last_text(server, GROUP)
    server.push(GROUP, BOB, "Bob", "/start")
    await wait_reply_count(server, GROUP, 8)
    assert "Welcome to the Lantern Inn" in last_text(server, GROUP)  # the character's greeting
    # Anyone may ask which mode the group is in; a word that names no mode changes nothing.
    server.push(GROUP, BOB, "Bob", "/mode")
    await wait_reply_count(server, GROUP, 9)
    assert last_text(server, GROUP).startswith("I play Mira (roleplay mode). Usage: /mode")
    server.push(GROUP, ANN, "Ann", "/mode dance")
    await wait_reply_count(server, GROUP, 10)
    assert last_text(server, GROUP).startswith("That is not a mode. I play Mira (roleplay mode).")
    conv = await core.conversations.get("telegram", f"telegram:{GROUP}")
    assert conv.mode == "roleplay"


async def test_two_player_roleplay_triggers_and_names(bot: Callable[..., Any]) -> None:
    server, _, character, core = await bot(character_script=["*Mira pours two ales.*"])
    await core.actions.set_mode("telegram", f"telegram:{GROUP}", "roleplay")
    server.push(GROUP, BOB, "Bob", "I lean on the bar and look around.")  # not addressed
    # The scene's first message opens it with the character's greeting.
    await wait_reply_count(server, GROUP, 1)
    assert "Welcome to the Lantern Inn" in last_text(server, GROUP)
    assert character.prompts == []  # Bob's line was only stored
    server.push(GROUP, ANN, "Ann", "Mira, two ales please!")  # names the character
    await server.wait_for(
        lambda: (
            last_text(server, GROUP) == "*Mira pours two ales.*"
            or (
                server.bot_messages(GROUP)[-1].parse_mode == "HTML"
                and "pours" in last_text(server, GROUP)
            )
        )
    )
    answer = server.bot_messages(GROUP)[-1]
    assert answer.reply_to is not None  # threaded to Ann's message
    prompt = text_of(character.prompts[-1])
    assert "Bob: I lean on the bar and look around." in prompt
    assert "Ann: Mira, two ales please!" in prompt
    assert prompt.index("Welcome to the Lantern Inn") < prompt.index("Bob: I lean")
    assert {"\nAnn:", "\nBob:"} <= set(character.stops[-1])
    server.push(GROUP, BOB, "Bob", "Thanks!", reply_to=answer.message_id)  # reply trigger
    await server.wait_for(lambda: len(character.prompts) == 2)
    assert "Bob: Thanks!" in text_of(character.prompts[-1])


async def test_work_group_answers_mentions_only(bot: Callable[..., Any]) -> None:
    server, office, *_ = await bot()
    server.push(GROUP, BOB, "Bob", "lunch anyone?")
    server.push(GROUP, ANN, "Ann", f"@{BOT['username']} draft the agenda")
    await wait_reply_count(server, GROUP, 1)
    assert len(office.prompts) == 1
    prompt = text_of(office.prompts[0])
    # Two people talk here: their turns carry their names.
    assert "Ann: draft the agenda" in prompt and "Bob: lunch anyone?" in prompt


async def test_a_long_reply_is_split_at_lines_outside_code(bot: Callable[..., Any]) -> None:
    prose = "\n".join(f"Line {i}: the quarterly numbers look fine this time." for i in range(70))
    code = "```python\n" + "\n".join(f"print({i} < {i + 1})" for i in range(600)) + "\n```"
    answer = f"{prose}\n\n{code}\n\nThat is all."
    server, *_ = await bot(office_script=[answer])
    server.push(DM, ANN, "Ann", "Give me a long report")
    await server.wait_for(
        lambda: server.bot_messages(DM) and "That is all." in last_text(server, DM)
    )
    await asyncio.sleep(0.2)
    messages = server.bot_messages(DM)
    assert len(messages) >= 3
    shown = []
    for m in messages:
        assert len(m.text) <= 4096
        if m.parse_mode == "HTML":
            assert m.text.count("<pre>") == m.text.count("</pre>")  # never cut inside code
            shown.append(html.unescape(re.sub(r"</?(pre|code)[^>]*>", "", m.text)))
        else:  # sent plain because markup and escapes would not fit: fences still balanced
            assert m.text.count("```") % 2 == 0
            shown.append(m.text)
    joined = "\n".join(shown)
    assert all(f"Line {i}:" in joined for i in range(70))
    assert all(f"print({i} < {i + 1})" in joined for i in range(600))
    assert any(m.parse_mode == "HTML" for m in messages)


async def test_rejected_formatting_falls_back_to_plain_text(bot: Callable[..., Any]) -> None:
    server, *_ = await bot(office_script=["**Bold** claim & more"])
    server.fail_next["editMessageText"] = "parse"
    server.fail_next["sendMessage"] = "parse"
    server.push(DM, ANN, "Ann", "hi")
    await server.wait_for(lambda: server.bot_messages(DM) and "claim" in last_text(server, DM))
    await asyncio.sleep(0.2)
    message = server.bot_messages(DM)[-1]
    assert message.text == "**Bold** claim & more" and message.parse_mode is None
    assert "editMessageText" not in server.fail_next or "sendMessage" not in server.fail_next


async def test_flood_control_is_waited_out(bot: Callable[..., Any]) -> None:
    server, *_ = await bot(office_script=["Delivered despite the flood."])
    server.fail_next["sendMessage"] = "flood"
    server.push(DM, ANN, "Ann", "hello?")
    await server.wait_for(
        lambda: server.bot_messages(DM) and "Delivered" in last_text(server, DM), within=30
    )
    sends = [p for m, p in server.calls if m == "sendMessage"]
    assert len(sends) >= 2  # the refused call was made again


async def test_other_update_kinds_are_ignored_or_noted(bot: Callable[..., Any]) -> None:
    server, office, *_ = await bot()
    server.push(GROUP, ANN, "Ann", None, extra={"sticker": _sticker()})
    server.push(
        GROUP,
        ANN,
        "Ann",
        None,
        extra={"new_chat_members": [{"id": 9, "is_bot": False, "first_name": "Cy"}]},
    )
    first = server.push(DM, ANN, "Ann", "typo")
    server.push(
        DM,
        ANN,
        "Ann",
        "edited text",
        kind="edited_message",
        extra={"message_id": first, "edit_date": 1},
    )
    server.push(DM, ANN, "Ann", None, extra={"sticker": _sticker()})
    server.push(DM, ANN, "Ann", None, extra={"photo": [_photo()]})
    server.push(DM, ANN, "Ann", "still there?")
    await server.wait_for(lambda: len(server.bot_messages(DM)) >= 4)
    texts = [m.text for m in server.bot_messages(DM)]
    assert sum("only read text" in t for t in texts) == 2  # sticker and photo notes
    assert server.bot_messages(GROUP) == []
    assert len(office.prompts) == 2  # "typo" and "still there?": the edit is not answered
    # ... but it replaced the stored text, so the next prompt reads it.
    assert "user\nedited text" in text_of(office.prompts[-1])
    assert "user\ntypo" not in text_of(office.prompts[-1])


def _sticker() -> dict[str, Any]:
    return {
        "file_id": "s1",
        "file_unique_id": "u1",
        "type": "regular",
        "width": 512,
        "height": 512,
        "is_animated": False,
        "is_video": False,
    }


def _photo() -> dict[str, Any]:
    return {"file_id": "p1", "file_unique_id": "pu1", "width": 90, "height": 90}


def test_settings_base_url_env_reaches_the_adapter(settings: Settings) -> None:
    from chat.settings import parse_settings

    parsed = parse_settings(
        {}, env={"TELEGRAM_BOT_TOKEN": "1:x", "TELEGRAM_BASE_URL": "http://127.0.0.1:9/bot"}
    )
    adapter = TelegramAdapter(
        ConversationCore(replace(settings), None, FixedModels({})),  # type: ignore[arg-type]
        parsed.platform("telegram"),
    )
    assert adapter.app.bot.base_url.startswith("http://127.0.0.1:9/bot")


async def test_character_card_upload_imports_it(bot: Callable[..., Any]) -> None:
    from tests.test_cards import V3, png_with

    server, *_ = await bot()

    def upload(
        chat: int, user: int, name: str, file_id: str, data: bytes, caption: str = ""
    ) -> None:
        server.files[file_id] = data
        document = {
            "file_id": file_id,
            "file_unique_id": f"u{file_id}",
            "file_name": f"{file_id}.png",
            "mime_type": "image/png",
            "file_size": len(data),
        }
        text = f"/character import {caption}".strip()
        server.push(chat, user, name, text, extra={"document": document})

    upload(DM, ANN, "Ann", "val", png_with({"ccv3": V3}))
    await server.wait_for(lambda: server.bot_messages(DM))
    assert "Imported Captain Valeria Storm" in last_text(server, DM)
    upload(DM, ANN, "Ann", "junk", b"definitely not a card")
    await wait_reply_count(server, DM, 2)
    assert "could not import that card" in last_text(server, DM)
    upload(GROUP, BOB, "Bob", "val2", png_with({"ccv3": V3}))
    await wait_reply_count(server, GROUP, 1)
    assert "Only the bot's owners can import characters" in last_text(server, GROUP)
    server.push(DM, ANN, "Ann", "/character Captain Valeria Storm")
    await wait_reply_count(server, DM, 3)
    assert "Captain Valeria Storm takes the stage" in server.bot_messages(DM)[2].text
    # A second import of the same name needs the replace flag, and the answer says so.
    upload(DM, ANN, "Ann", "val3", png_with({"ccv3": V3}))
    await wait_reply_count(server, DM, 4)
    assert "already exists" in last_text(server, DM) and "replace" in last_text(server, DM)
    upload(DM, ANN, "Ann", "val4", png_with({"ccv3": V3}), caption="replace")
    await wait_reply_count(server, DM, 5)
    assert "Replaced the earlier Captain Valeria Storm" in last_text(server, DM)


ANONYMOUS_ADMIN = {"id": 1087968824, "is_bot": True, "first_name": "Group"}


async def test_anonymous_admins_may_and_a_failing_member_check_is_refused_politely(
    bot: Callable[..., Any],
) -> None:
    server, _, _, core = await bot()
    # Sent as the group itself: only an administrator can do that.
    as_group = {"from": ANONYMOUS_ADMIN, "sender_chat": {"id": GROUP, "type": "supergroup"}}
    server.push(GROUP, 0, "Group", "/mode roleplay", extra=as_group)
    await wait_reply_count(server, GROUP, 1)
    assert "Mode set to roleplay" in server.bot_messages(GROUP)[0].text
    server.fail_next["getChatMember"] = "error"
    server.push(GROUP, BOB, "Bob", "/mode work")
    await server.wait_for(
        lambda: any("could not check" in m.text for m in server.bot_messages(GROUP))
    )
    conv = await core.conversations.get("telegram", f"telegram:{GROUP}")
    assert conv.mode == "roleplay"  # unchanged
    # A transient failure (a 502 from Telegram's edge) is tried once more before refusing.
    server.admins.add((GROUP, ANN))
    server.fail_next["getChatMember"] = "bad_gateway"
    server.push(GROUP, ANN, "Ann", "/mode work")
    await server.wait_for(lambda: "Mode set to work" in last_text(server, GROUP))


async def test_unknown_commands_get_a_pointer_and_non_owners_cannot_import_by_dm(
    bot: Callable[..., Any],
) -> None:
    from tests.test_cards import V3, png_with

    server, _, _, core = await bot()
    server.push(BOB, BOB, "Bob", "/frobnicate now")  # in his own private chat
    await wait_reply_count(server, BOB, 1)
    assert last_text(server, BOB) == "/frobnicate is not one of my commands; send /help."
    server.push(GROUP, BOB, "Bob", "/weather@other_bot")  # another bot's command: not ours
    server.push(GROUP, BOB, "Bob", "/" * 100)
    await wait_reply_count(server, GROUP, 1)
    assert "send /help" in last_text(server, GROUP)
    server.files["card"] = png_with({"ccv3": V3})
    document = {"file_id": "card", "file_unique_id": "ucard", "file_name": "v.png", "file_size": 9}
    server.push(BOB, BOB, "Bob", "/character import", extra={"document": document})
    await wait_reply_count(server, BOB, 2)
    assert "Only the bot's owners can import characters" in last_text(server, BOB)
    assert core.characters.find("Captain Valeria Storm") is None
    await asyncio.sleep(0.3)
    assert len(server.bot_messages(GROUP)) == 1  # nothing for /weather@other_bot


async def test_an_outage_does_not_cost_the_reply_it_is_stored_then_delivered_once(
    bot: Callable[..., Any], store: Store
) -> None:
    server, office, _, core = await bot(office_script=["Here is the whole answer, at last."])
    office.delay = 0.01
    # For 30 s, sends and edits fail: half with a 500, half hanging until the client's
    # timeout gives up on them.
    server.down_kind = "mixed"
    server.down_until = time.monotonic() + 30.0
    server.push(DM, ANN, "Ann", "Are you there?")
    conv = await core.conversations.get("telegram", f"telegram:{DM}")
    assert await stored_replies(store, conv.id) == ["Here is the whole answer, at last."]
    assert time.monotonic() < server.down_until - 25  # stored at once, the platform down
    await server.wait_for(lambda: server.bot_messages(DM), 120)
    assert time.monotonic() >= server.down_until
    await asyncio.sleep(0.5)
    assert [m.text for m in server.bot_messages(DM)] == ["Here is the whole answer, at last."]
    (user,) = [m for m in await store.messages.history(conv.id) if m.role == "user"]
    assert await reply_state(store, user.id) == "answered"


async def test_memory_commands_edits_and_a_reply_without_a_name_tag(
    bot: Callable[..., Any],
) -> None:
    server, office, _, core = await bot(office_script=["Ann: Noted: 3,000 euros.", "Sure."])
    mid = server.push(DM, ANN, "Ann", "Our budget is 3,000 euros.")
    await server.wait_for(lambda: server.bot_messages(DM))
    conv = await core.conversations.get("telegram", f"telegram:{DM}")
    # The model imitated a name tag: the reply is cleaned before it is shown and stored.
    assert await stored_replies(core.store, conv.id) == ["Noted: 3,000 euros."]
    await server.wait_for(lambda: last_text(server, DM) == "Noted: 3,000 euros.")
    assert "Ann:" not in text_of(office.prompts[-1])

    server.edit(DM, ANN, "Ann", mid, "Our budget is 4,500 euros.")
    await wait_until_stored(core, conv.id, "Our budget is 4,500 euros.")
    server.push(DM, ANN, "Ann", "/remember The client is Globex.")
    await wait_reply_count(server, DM, 2)
    assert "I will remember that (fact 1)" in last_text(server, DM)
    server.push(DM, ANN, "Ann", "/memory")
    await wait_reply_count(server, DM, 3)
    assert "1. The client is Globex." in html.unescape(last_text(server, DM))
    server.push(DM, ANN, "Ann", "And the deadline?")
    await wait_reply_count(server, DM, 4)
    prompt = text_of(office.prompts[-1])
    assert "user\nOur budget is 4,500 euros." in prompt and "budget is 3,000" not in prompt
    assert "1. The client is Globex." in prompt  # pinned after the system part
    assert len(office.prompts) == 2  # the edit of an answered message was not answered again
    server.push(DM, ANN, "Ann", "/forget 1")
    await wait_reply_count(server, DM, 5)
    assert "Forgotten: The client is Globex." in last_text(server, DM)
    server.push(DM, ANN, "Ann", "/summarize 2")
    await wait_reply_count(server, DM, 6)
    assert "Summarize this part of a team chat" in text_of(office.prompts[-1])

    # In a group, pinning and unpinning need an administrator; reading the memory does not.
    server.push(GROUP, BOB, "Bob", "/remember Bob is the boss")
    await wait_reply_count(server, GROUP, 1)
    assert "Only chat administrators can pin facts" in last_text(server, GROUP)
    server.push(GROUP, BOB, "Bob", "/forget 1")
    await wait_reply_count(server, GROUP, 2)
    assert "Only chat administrators can unpin facts" in last_text(server, GROUP)
    server.push(GROUP, BOB, "Bob", "/memory")
    await wait_reply_count(server, GROUP, 3)
    assert "No pinned facts" in last_text(server, GROUP)
    # A persona is each player's own: no administrator needed.
    server.push(GROUP, BOB, "Bob", "/persona Galahad: a weary knight")
    await wait_reply_count(server, GROUP, 4)
    assert "you play as Galahad" in last_text(server, GROUP)
    group = await core.conversations.get("telegram", f"telegram:{GROUP}")
    assert group.settings["personas"][str(BOB)]["description"] == "a weary knight"


async def wait_until_stored(core: ConversationCore, conversation_id: int, text: str) -> None:
    deadline = time.monotonic() + 30
    while text not in [m.text for m in await core.store.messages.history(conversation_id)]:
        assert time.monotonic() < deadline, f"{text!r} never stored"
        await asyncio.sleep(0.05)


# -- a busy group: commands beside answers in flight, arrival order ----------------------------


async def test_continue_while_a_reply_streams_grows_that_reply_only(
    bot: Callable[..., Any],
) -> None:
    server, office, *_ = await bot(office_script=["First answer.", "Second answer.", " More."])
    server.push(DM, ANN, "Ann", "one?")
    await wait_reply_count(server, DM, 1)
    first = server.bot_messages(DM)[0]
    await server.wait_for(lambda: first.text == "First answer.")
    office.gate = asyncio.Event()
    server.push(DM, ANN, "Ann", "two?")
    await server.wait_for(lambda: len(office.prompts) == 2)
    server.push(DM, ANN, "Ann", "/continue")
    await asyncio.sleep(0.5)
    office.gate.set()
    await server.wait_for(
        lambda: any(
            html.unescape(m.text) == "Second answer. More." for m in server.bot_messages(DM)
        )
    )
    assert first.text == "First answer." and "Second" not in " ".join(first.edits)


async def test_reset_in_a_group_applies_before_the_next_message_even_while_rights_are_checked(
    bot: Callable[..., Any],
) -> None:
    server, office, _, core = await bot(office_script=lambda p: f"seen: {text_of(p)[-60:]}")
    server.admins.add((GROUP, ANN))
    server.push(GROUP, BOB, "Bob", "@lantern_bot old story: the dragon sleeps")
    await wait_reply_count(server, GROUP, 1)
    server.member_delay_s = 1.0  # getChatMember is slow
    server.push(GROUP, ANN, "Ann", "/reset")
    server.push(GROUP, ANN, "Ann", "@lantern_bot New story: the ship sinks")
    await server.wait_for(lambda: len(office.prompts) == 2, within=20)
    prompt = text_of(office.prompts[-1])
    assert "New story: the ship sinks" in prompt and "dragon" not in prompt
    conv = await core.conversations.get("telegram", f"telegram:{GROUP}")
    stored = [m for m in await core.store.messages.history(conv.id, after_id=conv.reset_after_id)]
    assert [m.text for m in stored if m.role == "user"] == ["New story: the ship sinks"]


async def test_mode_in_a_group_routes_the_next_message_even_while_rights_are_checked(
    bot: Callable[..., Any],
) -> None:
    server, office, character, core = await bot()
    await core.actions.set_mode("telegram", f"telegram:{GROUP}", "roleplay")
    server.admins.add((GROUP, ANN))
    server.member_delay_s = 1.0
    server.push(GROUP, ANN, "Ann", "/mode work")
    server.push(GROUP, ANN, "Ann", "@lantern_bot the agenda, please")
    try:
        await server.wait_for(lambda: office.prompts, within=60)
    except AssertionError as exc:  # what the bot did instead (this test failed once in CI)
        said = [m.text for m in server.bot_messages(GROUP)]
        asked = [text_of(p)[-120:] for p in character.prompts]
        raise AssertionError(f"said {said}; character asked {asked}; {server.methods()}") from exc
    assert "the agenda, please" in text_of(office.prompts[-1])
    assert not any("the agenda" in text_of(p) for p in character.prompts)


async def test_ping_answers_pong_and_the_uptime(bot: Callable[..., Any]) -> None:
    server, *_ = await bot()
    assert "ping" in [c["command"] for c in server.commands]
    server.push(GROUP, BOB, "Bob", "/ping")
    await wait_reply_count(server, GROUP, 1)
    assert last_text(server, GROUP).startswith("pong — up for 0 min")


def post_file(
    server: FakeTelegram,
    chat_id: int,
    user_id: int,
    name: str,
    filename: str,
    data: bytes,
    caption: str | None = None,
    size: int | None = None,
) -> int:
    file_id = f"f{len(server.files)}"
    server.files[file_id] = data
    document = {
        "file_id": file_id,
        "file_unique_id": f"u{file_id}",
        "file_name": filename,
        "file_size": len(data) if size is None else size,
    }
    return server.push(chat_id, user_id, name, caption, extra={"document": document})


async def test_posted_documents_are_read_listed_cited_and_scoped(bot: Callable[..., Any]) -> None:
    from tests.document_files import docx_file, pdf
    from tests.test_documents import PAGES, documents_block

    server, office, _, core = await bot(office_script=["Ninety days [1]."])
    post_file(server, DM, ANN, "Ann", "contract.pdf", pdf(PAGES))
    await wait_reply_count(server, DM, 1)
    post_file(server, DM, ANN, "Ann", "minutes.docx", docx_file(["The board met on Tuesday."]))
    await wait_reply_count(server, DM, 2)
    post_file(server, DM, ANN, "Ann", "notes.txt", b"Remember the milk.")
    await wait_reply_count(server, DM, 3)
    said = [m.text for m in server.bot_messages(DM)]
    assert said[0].startswith("Read contract.pdf (PDF, 4 pages, ")
    assert said[1].startswith("Read minutes.docx (DOCX, 1 passage)")
    assert said[2].startswith("Read notes.txt (TEXT, 1 passage)")
    server.push(DM, ANN, "Ann", "/docs")
    await wait_reply_count(server, DM, 4)
    assert "1. contract.pdf (PDF, 4 pages" in last_text(server, DM)
    assert "3. notes.txt (TEXT" in last_text(server, DM)

    # A file with its question as the caption: read first, then answered from it.
    post_file(
        server,
        DM,
        ANN,
        "Ann",
        "terms.txt",
        b"Refunds are issued within 14 days.",
        caption="how fast are refunds?",
    )
    await server.wait_for(lambda: office.prompts)
    assert "[1] terms.txt:\nRefunds are issued within 14 days." in documents_block(
        office.prompts[-1]
    )
    server.push(DM, ANN, "Ann", "what is the notice period?")
    await server.wait_for(lambda: len(office.prompts) == 2)
    assert "[1] contract.pdf, page 3:" in documents_block(office.prompts[-1])
    await server.wait_for(
        lambda: last_text(server, DM).endswith("Sources: [1] contract.pdf, page 3")
    )

    # The same question in a group: none of the DM's documents.
    server.push(GROUP, BOB, "Bob", "@lantern_bot what is the notice period?")
    await server.wait_for(lambda: len(office.prompts) == 3)
    assert "ninety" not in text_of(office.prompts[-1]).lower()

    # Announced bigger than the Bot API serves: refused before any download.
    post_file(server, DM, ANN, "Ann", "video.txt", b"x", size=50 * 1024 * 1024)
    await server.wait_for(
        lambda: "video.txt is 50.0 MB; I read files up to 20.0 MB." in last_text(server, DM)
    )
    server.push(DM, ANN, "Ann", "/docs forget 2")
    await server.wait_for(lambda: last_text(server, DM).startswith("Forgot minutes.docx"))
    server.push(DM, ANN, "Ann", "/reset all")
    await server.wait_for(lambda: "deleted its 3 document(s)" in last_text(server, DM))
    conv = await core.conversations.get("telegram", f"telegram:{DM}")
    assert await core.documents.of(conv.id) == []


async def test_files_in_a_roleplay_chat_stay_none_of_the_bots_business(
    bot: Callable[..., Any],
) -> None:
    server, *_, core = await bot()
    await core.actions.set_mode("telegram", f"telegram:{DM}", "roleplay")
    post_file(server, DM, ANN, "Ann", "notes.txt", b"Remember the milk.")
    await wait_reply_count(server, DM, 1)
    assert last_text(server, DM) == TEXT_ONLY


FAST_REMINDERS = ReminderSettings(poll_s=0.2, late_after_s=2, min_interval_s=1)


def last_says(server: FakeTelegram, chat_id: int, part: str) -> bool:
    shown = server.bot_messages(chat_id)
    return bool(shown) and part in shown[-1].text


def reminders_of(server: FakeTelegram, chat_id: int, what: str) -> list[Any]:
    return [m for m in server.bot_messages(chat_id) if f"Reminder: {what}" in m.text]


async def test_reminders_arrive_once_with_a_mention_recur_and_survive_a_stop(
    bot: Callable[..., Any],
) -> None:
    server, *_ = await bot(reminders=FAST_REMINDERS)
    server.push(GROUP, ANN, "Ann", "/remind in 2 seconds send the report")
    await server.wait_for(lambda: last_says(server, GROUP, "I will remind you"))
    set_at = time.monotonic()
    await server.wait_for(lambda: reminders_of(server, GROUP, "send the report"), within=10)
    assert time.monotonic() - set_at < 2 + 5  # on time, within the promised 5 s
    shown = reminders_of(server, GROUP, "send the report")[0]
    # The owner is pinged by id, whatever the name: a text mention over "Ann".
    assert shown.text.startswith("Ann ⏰ Reminder: send the report")
    assert [(e["type"], e["offset"], e["length"], e["user"]["id"]) for e in shown.entities] == [
        ("text_mention", 0, 3, ANN)
    ]
    assert "Late" not in shown.text

    server.push(GROUP, BOB, "Bob", "/remind every 2 seconds stretch")
    await server.wait_for(lambda: len(reminders_of(server, GROUP, "stretch")) >= 2, within=15)
    server.push(GROUP, BOB, "Bob", "/reminders")
    await server.wait_for(lambda: last_says(server, GROUP, "Reminders here (1)"))
    assert "every 2 seconds · Bob: stretch" in last_text(server, GROUP)
    server.push(GROUP, ANN, "Ann", "/reminders cancel 1")  # Bob's, and Ann is no admin
    await server.wait_for(lambda: last_says(server, GROUP, "Only whoever set it"))
    server.push(GROUP, BOB, "Bob", "/reminders cancel 1")
    await server.wait_for(lambda: last_says(server, GROUP, "Cancelled: stretch"))
    fired = len(reminders_of(server, GROUP, "stretch"))
    await asyncio.sleep(3)
    assert len(reminders_of(server, GROUP, "stretch")) == fired  # cancelled means stopped
    assert len(reminders_of(server, GROUP, "send the report")) == 1  # once, never again

    # One that falls due while the bot is stopped is delivered at the next start, once.
    server.push(DM, ANN, "Ann", "/remind in 2 seconds water the plants")
    await server.wait_for(lambda: last_says(server, DM, "I will remind you"))
    adapter, task = bot.running[-1]  # type: ignore[attr-defined]
    await adapter.stop()
    await asyncio.wait_for(task, 10)
    await asyncio.sleep(5)
    assert not reminders_of(server, DM, "water the plants")
    await bot(reminders=FAST_REMINDERS)
    await server.wait_for(lambda: reminders_of(server, DM, "water the plants"), within=10)
    await asyncio.sleep(1)
    late = reminders_of(server, DM, "water the plants")
    assert len(late) == 1 and "(Late: this was due" in late[0].text


async def test_reminder_and_time_zone_commands_refuse_politely(bot: Callable[..., Any]) -> None:
    server, *_ = await bot()
    for words, says in [
        ("/remind", "Usage: /remind"),
        ("/remind sometime soon-ish", "I could not tell when"),
        ("/remind every 5 seconds spam", "repeats too often"),
        ("/reminders cancel 9", "There is no reminder 9"),
        ("/timezone Mars/Olympus", "not a time zone"),
        ("/timezone Europe/Berlin", "time zone is now Europe/Berlin"),
    ]:
        count = len(server.bot_messages(DM))
        server.push(DM, ANN, "Ann", words)
        await wait_reply_count(server, DM, count + 1)
        assert says in last_text(server, DM), words
    server.push(GROUP, BOB, "Bob", "/timezone Asia/Tokyo")  # a group's zone: admins only
    await server.wait_for(lambda: last_says(server, GROUP, "Only"))
