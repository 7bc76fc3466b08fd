"""Who a message names, and its author's rights, as the real discord.py and python-telegram-bot
clients deliver them to the engine (``IncomingMessage.mentions`` and ``is_admin``: what the tools
act on)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from adapters.streaming import StreamLimits
from adapters.telegram import TelegramAdapter
from chat.core import ConversationCore
from chat.messages import IncomingMessage, OutgoingReply
from chat.settings import PlatformSettings, Settings
from storage import Store
from tests.conftest import FixedModels
from tests.fake_telegram import BOT, FakeTelegram
from tests.scripted import ScriptedModel
from tests.waiting import wait_until

GROUP = -100900
ANN, BOB, CAROL, DEE = 901, 902, 903, 904


def recording(core: ConversationCore) -> list[IncomingMessage]:
    """The messages the adapter hands to the engine, in order."""
    seen: list[IncomingMessage] = []
    respond = core.answers.respond

    def record(msg: IncomingMessage, *args: Any, **kw: Any) -> AsyncIterator[OutgoingReply]:
        seen.append(msg)
        return respond(msg, *args, **kw)

    core.answers.respond = record  # type: ignore[method-assign]
    return seen


def person(uid: int, name: str, bot: bool = False) -> dict[str, Any]:
    return {"id": uid, "is_bot": bot, "first_name": name}


async def test_telegram_mentions_replies_captions_and_rights_reach_the_engine(
    telegram: FakeTelegram, settings: Settings, store: Store
) -> None:
    model = ScriptedModel(["Noted."])
    core = ConversationCore(settings, store, FixedModels({"office": model, "character": model}))
    seen = recording(core)
    telegram.admins.add((GROUP, ANN))
    platform = PlatformSettings(token="123:TEST", api_base_url=telegram.base_url)
    adapter = TelegramAdapter(core, platform, poll_timeout=1, limits=StreamLimits(4096, 0.05, 10))
    task = asyncio.create_task(adapter.start())
    handle = "@" + BOT["username"]
    asked = f"{handle} remind Bob"
    try:
        await telegram.wait_for(lambda: "setMyCommands" in telegram.methods())
        # A mention by name (no username: it carries the user), beside a bot's.
        telegram.push(
            GROUP,
            ANN,
            "Ann",
            asked,
            extra={
                "entities": [
                    {"type": "mention", "offset": 0, "length": len(handle)},
                    {
                        "type": "text_mention",
                        "offset": len(asked) - 3,
                        "length": 3,
                        "user": person(BOB, "Bob"),
                    },
                    {
                        "type": "text_mention",
                        "offset": 0,
                        "length": 1,
                        "user": person(77, "Helper", bot=True),
                    },
                ]
            },
        )
        # A reply to Carol's message names Carol.
        telegram.push(
            GROUP,
            BOB,
            "Bob",
            f"{handle} and her too",
            extra={
                "reply_to_message": {
                    "message_id": 1,
                    "date": 0,
                    "chat": {"id": GROUP, "type": "supergroup", "title": "Scene"},
                    "from": person(CAROL, "Carol"),
                    "text": "hi",
                }
            },
        )
        await wait_until(lambda: len(seen) == 2)
        first, second = seen
        assert first.is_admin is not None and second.is_admin is not None
        rights = (await first.is_admin(), await second.is_admin())  # asked of Telegram
    finally:
        await adapter.stop()
        await asyncio.wait_for(task, 10)
    assert first.mentions == ((str(BOB), "Bob"),)  # not the bot it also names
    assert second.mentions == ((str(CAROL), "Carol"),)
    assert rights == (True, False)


def test_telegram_reads_mentions_in_a_files_caption() -> None:
    from telegram import Message

    from adapters.telegram.intake import mentioned

    caption = "for Dee"
    message = Message.de_json(
        {
            "message_id": 5,
            "date": 0,
            "chat": {"id": GROUP, "type": "supergroup", "title": "Scene"},
            "from": person(ANN, "Ann"),
            "caption": caption,
            "document": {"file_id": "f", "file_unique_id": "u", "file_name": "a.txt"},
            "caption_entities": [
                {"type": "text_mention", "offset": 4, "length": 3, "user": person(DEE, "Dee")}
            ],
        },
        None,
    )
    assert mentioned(message) == ((str(DEE), "Dee"),)


async def test_discord_mentions_and_rights_reach_the_engine(
    settings: Settings, store: Store
) -> None:
    from adapters.discord import DiscordAdapter
    from tests.fake_discord import APP_ID, BOT_USER, CHANNEL_WORK, GUILD, FakeDiscord, user

    server = FakeDiscord()
    await server.start()
    model = ScriptedModel(["Noted."])
    core = ConversationCore(settings, store, FixedModels({"office": model, "character": model}))
    seen = recording(core)
    platform = PlatformSettings(token="TEST", api_base_url=server.api_url, guild_id=int(GUILD))
    adapter = DiscordAdapter(core, platform, limits=StreamLimits(2000, 0.05, 10))
    task = asyncio.create_task(adapter.start())
    ann, bob, helper = user("21", "Ann"), user("22", "Bob"), {**user("23", "Helper"), "bot": True}
    try:
        await asyncio.wait_for(adapter.ready.wait(), 20)
        content = f"<@{APP_ID}> remind <@22> and <@23>"
        await server.say(CHANNEL_WORK, ann, content, admin=True, mentions=[BOT_USER, bob, helper])
        await server.say(CHANNEL_WORK, bob, "and me", mention_bot=True)
        await wait_until(lambda: len(seen) == 2)
        first, second = seen
        assert first.is_admin is not None and second.is_admin is not None
        rights = (await first.is_admin(), await second.is_admin())
    finally:
        await adapter.stop()
        await asyncio.wait_for(task, 10)
        await server.stop()
    assert first.mentions == (("22", "Bob"),)  # neither the bot nor us
    assert second.mentions == ()
    assert rights == (True, False)
