"""The Discord adapter end to end: real discord.py against a local Discord-compatible server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import pytest

from adapters.discord import DiscordAdapter
from adapters.discord.sinks import webhook_username
from adapters.streaming import StreamLimits
from chat.core import ConversationCore
from chat.reminders.limits import ReminderSettings
from chat.settings import PlatformSettings, Settings
from storage import Store
from tests.conftest import FixedModels
from tests.fake_discord import (
    APP_ID,
    CHANNEL_LOCKED,
    CHANNEL_NO_HOOKS,
    CHANNEL_ROLEPLAY,
    CHANNEL_WORK,
    DM_CHANNEL,
    GUILD,
    THREAD,
    FakeDiscord,
    user,
)
from tests.scripted import ScriptedModel
from tests.test_core import text_of
from tests.waiting import stored_replies

ANN = user("11", "Ann")
BOB = user("12", "Bob")
OTHER_BOT = {**user("13", "Helper"), "bot": True}


@pytest.fixture
async def discord_server() -> AsyncIterator[FakeDiscord]:
    server = FakeDiscord()
    await server.start()
    yield server
    await server.stop()


Harness = tuple[FakeDiscord, ScriptedModel, ScriptedModel, ConversationCore]


@pytest.fixture
async def bot(
    discord_server: FakeDiscord, settings: Settings, store: Store
) -> AsyncIterator[Callable[..., Any]]:
    running: list[tuple[DiscordAdapter, asyncio.Task[None]]] = []

    async def start(
        office_script: Any = ("Here you go.",),
        character_script: Any = ("*Mira nods.*",),
        **changes: Any,
    ) -> Harness:
        office, character = ScriptedModel(office_script), ScriptedModel(character_script)
        # Ann is the bot's owner: she may import characters (admin or not).
        owned = replace(settings, owner_ids=frozenset({"discord:11"}), **changes)
        core = ConversationCore(
            owned, store, FixedModels({"office": office, "character": character})
        )
        platform = PlatformSettings(
            token="TEST", api_base_url=discord_server.api_url, guild_id=int(GUILD)
        )
        adapter = DiscordAdapter(core, platform, limits=StreamLimits(2000, 0.05, 10))
        task = asyncio.create_task(adapter.start())
        running.append((adapter, task))
        await asyncio.wait_for(adapter.ready.wait(), 20)
        return discord_server, office, character, core

    start.running = running  # type: ignore[attr-defined]  # for tests that stop one
    yield start
    for adapter, task in running:
        await adapter.stop()
        await asyncio.wait_for(task, 10)
    # Every interaction was acknowledged in time, and once (Discord's rules).
    assert discord_server.late_interactions == [] and discord_server.double_acks == []


def last(server: FakeDiscord, channel: str) -> str:
    return server.in_channel(channel)[-1].content


async def test_commands_sync_to_the_guild_and_dm_gets_an_answer(bot: Callable[..., Any]) -> None:
    server, office, *_ = await bot()
    names = {c["name"] for c in server.commands[GUILD]}
    assert {"chat", "mode", "character", "reset", "regenerate", "help"} <= names
    await server.say(DM_CHANNEL, ANN, "Hello there")
    await server.wait_for(lambda: server.in_channel(DM_CHANNEL))
    assert last(server, DM_CHANNEL) == "Here you go."
    assert "user\nHello there" in text_of(office.prompts[-1])  # one human: no name


def opt(name: str, value: Any) -> dict[str, Any]:
    return {"type": 3, "name": name, "value": value}


def sub(name: str, *options: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"type": 1, "name": name, "options": list(options)}]


async def test_mode_needs_manage_channels_and_opens_the_scene(bot: Callable[..., Any]) -> None:
    server, _, _, core = await bot()
    token = await server.command(CHANNEL_ROLEPLAY, BOB, "mode", [])  # anyone may ask
    await server.wait_for(lambda: server.responses(token))
    shown = server.responses(token)[0]
    assert shown.ephemeral and shown.content.startswith("I am the office assistant here (work")
    token = await server.command(CHANNEL_ROLEPLAY, BOB, "mode", [opt("mode", "roleplay")])
    await server.wait_for(lambda: server.responses(token))
    refusal = server.responses(token)[0]
    assert refusal.ephemeral and "Manage Channels" in refusal.content
    assert (await core.conversations.get("discord", f"discord:{CHANNEL_ROLEPLAY}")).mode is None
    token = await server.command(
        CHANNEL_ROLEPLAY, ANN, "mode", [opt("mode", "roleplay")], admin=True
    )
    await server.wait_for(lambda: server.in_channel(CHANNEL_ROLEPLAY))
    answer = server.responses(token)[0]
    assert not answer.ephemeral and "roleplay mode" in answer.content
    greeting = server.in_channel(CHANNEL_ROLEPLAY)[0]
    assert greeting.webhook_id is not None and greeting.username == "Mira"  # as the character
    assert "Welcome to the Lantern Inn" in greeting.content


async def test_character_commands(bot: Callable[..., Any]) -> None:
    server, *_ = await bot()
    token = await server.command(
        CHANNEL_WORK, BOB, "character", sub("set", opt("name", "Captain Reyes"))
    )
    await server.wait_for(lambda: server.responses(token))
    assert "Manage Channels" in server.responses(token)[0].content
    token = await server.command(
        CHANNEL_WORK, ANN, "character", sub("set", opt("name", "Captain Reyes")), admin=True
    )
    await server.wait_for(lambda: server.responses(token))
    assert "Captain Reyes takes the stage" in server.responses(token)[0].content
    token = await server.command(CHANNEL_WORK, BOB, "character", sub("show"))
    await server.wait_for(lambda: server.responses(token))
    shown = server.responses(token)[0]
    assert shown.ephemeral and "**Captain Reyes**" in shown.content and "Meridian" in shown.content
    assert "Greeting" in shown.content
    token = await server.command(CHANNEL_WORK, BOB, "character", sub("list"))
    await server.wait_for(lambda: server.responses(token))
    assert "Mira" in server.responses(token)[0].content
    token = await server.command(
        CHANNEL_WORK, ANN, "character", sub("set", opt("name", "Nobody")), admin=True
    )
    await server.wait_for(lambda: server.responses(token))
    assert "don't know a character called Nobody" in server.responses(token)[0].content


async def test_reset_help_chat_and_regenerate(bot: Callable[..., Any]) -> None:
    server, office, *_ = await bot(office_script=["First answer.", "Second answer.", "Third."])
    token = await server.command(CHANNEL_WORK, BOB, "reset")
    await server.wait_for(lambda: server.responses(token))
    assert "Manage Channels" in server.responses(token)[0].content
    token = await server.command(DM_CHANNEL, BOB, "reset")  # anyone may, in DMs
    await server.wait_for(lambda: server.responses(token))
    assert "fresh conversation" in server.responses(token)[0].content
    token = await server.command(CHANNEL_WORK, BOB, "help")
    await server.wait_for(lambda: server.responses(token))
    help_ = server.responses(token)[0]
    assert help_.ephemeral and "work mode" in help_.content and "/mode" in help_.content

    token = await server.command(CHANNEL_WORK, ANN, "chat", [opt("message", "Plan my week")])
    await server.wait_for(
        lambda: server.responses(token) and server.responses(token)[0].content == "First answer."
    )
    assert server.callbacks[-1]["type"] == 5  # deferred, then the answer streamed into it
    assert "user\nPlan my week" in text_of(office.prompts[-1])  # one human so far: no name

    mid = await server.say(CHANNEL_WORK, ANN, "and next week?", mention_bot=True)
    await server.wait_for(lambda: server.in_channel(CHANNEL_WORK))
    reply = server.in_channel(CHANNEL_WORK)[-1]
    assert reply.content == "Second answer." and reply.reference == mid
    token = await server.command(CHANNEL_WORK, ANN, "regenerate")
    await server.wait_for(lambda: reply.content == "Third.")
    assert len(server.in_channel(CHANNEL_WORK)) == 1  # replaced in place, not a new message
    assert server.responses(token)[0].ephemeral
    assert "Second answer." not in text_of(office.prompts[-1])


async def test_two_player_scene_posts_as_the_character(bot: Callable[..., Any]) -> None:
    server, _, character, core = await bot(character_script=["*Mira pours two ales.*"])
    await core.actions.set_mode("discord", f"discord:{CHANNEL_ROLEPLAY}", "roleplay")
    await server.say(CHANNEL_ROLEPLAY, BOB, "I sit by the fire.")  # stored, not answered
    await server.wait_for(lambda: server.in_channel(CHANNEL_ROLEPLAY))  # the scene's greeting
    await server.say(CHANNEL_ROLEPLAY, ANN, "Mira, two ales please!")  # names the character
    await server.wait_for(
        lambda: (
            len(server.in_channel(CHANNEL_ROLEPLAY)) >= 2
            and "pours" in last(server, CHANNEL_ROLEPLAY)
        )
    )
    post = server.in_channel(CHANNEL_ROLEPLAY)[-1]
    assert post.webhook_id is not None and post.username == "Mira"
    prompt = text_of(character.prompts[-1])
    assert "Bob: I sit by the fire." in prompt and "Ann: Mira, two ales please!" in prompt
    assert {"\nAnn:", "\nBob:"} <= set(character.stops[-1])
    assert len(server.webhooks) == 1  # one cached webhook per channel
    # A reply to the character's webhook post addresses the bot too.
    await server.say(CHANNEL_ROLEPLAY, BOB, "Cheers!", reply_to=post.id)
    await server.wait_for(lambda: len(character.prompts) == 2)
    assert len(server.webhooks) == 1


async def test_thread_posts_through_the_parent_webhook(bot: Callable[..., Any]) -> None:
    server, _, _, core = await bot()
    await core.actions.set_mode("discord", f"discord:{THREAD}", "roleplay")
    await server.say(THREAD, ANN, "Mira, a quiet word?", mention_bot=True)
    await server.wait_for(lambda: len([p for p in server.posted if p.thread_id == THREAD]) >= 2)
    posts = [p for p in server.posted if p.thread_id == THREAD]
    assert all(p.channel_id == CHANNEL_ROLEPLAY and p.username == "Mira" for p in posts)


async def test_without_manage_webhooks_it_prefixes_the_name(bot: Callable[..., Any]) -> None:
    server, _, _, core = await bot()
    await core.actions.set_mode("discord", f"discord:{CHANNEL_NO_HOOKS}", "roleplay")
    await server.say(CHANNEL_NO_HOOKS, ANN, "Mira?", mention_bot=True)
    await server.wait_for(lambda: len(server.in_channel(CHANNEL_NO_HOOKS)) >= 2)
    texts = [p.content for p in server.in_channel(CHANNEL_NO_HOOKS)]
    assert texts[0].startswith("**Mira:** *Mira looks up")
    assert texts[1] == "**Mira:** *Mira nods.*"
    assert server.webhooks == [] and all(
        p.webhook_id is None for p in server.in_channel(CHANNEL_NO_HOOKS)
    )


async def test_unknown_webhook_is_refreshed_and_retried(bot: Callable[..., Any]) -> None:
    server, _, _, core = await bot()
    await core.actions.set_mode("discord", f"discord:{CHANNEL_ROLEPLAY}", "roleplay")
    await server.say(CHANNEL_ROLEPLAY, ANN, "Mira!", mention_bot=True)
    await server.wait_for(lambda: len(server.in_channel(CHANNEL_ROLEPLAY)) >= 2)
    server.webhooks.clear()  # somebody deleted our webhook
    await server.say(CHANNEL_ROLEPLAY, ANN, "Mira, again!", mention_bot=True)
    await server.wait_for(lambda: len(server.in_channel(CHANNEL_ROLEPLAY)) >= 3)
    assert len(server.webhooks) == 1 and server.in_channel(CHANNEL_ROLEPLAY)[-1].username == "Mira"


async def test_work_channel_answers_mentions_only(bot: Callable[..., Any]) -> None:
    server, office, *_ = await bot()
    await server.say(CHANNEL_WORK, BOB, "lunch anyone?")
    await server.say(CHANNEL_WORK, ANN, "draft the agenda", mention_bot=True)
    await server.wait_for(lambda: server.in_channel(CHANNEL_WORK))
    assert len(office.prompts) == 1
    prompt = text_of(office.prompts[0])
    # Two people talk here: their turns carry their names.
    assert "Ann: draft the agenda" in prompt and "Bob: lunch anyone?" in prompt
    assert CHANNEL_WORK in server.typing


async def test_a_long_reply_is_split_outside_code_fences(bot: Callable[..., Any]) -> None:
    prose = "\n".join(f"Point {i}: the budget is on track." for i in range(50))
    code = "```py\n" + "\n".join(f"x{i} = {i}" for i in range(400)) + "\n```"
    server, *_ = await bot(office_script=[f"{prose}\n\n{code}\n\nEnd of report."])
    await server.say(DM_CHANNEL, ANN, "report please")
    await server.wait_for(
        lambda: server.in_channel(DM_CHANNEL) and "End of report." in last(server, DM_CHANNEL)
    )
    messages = [p.content for p in server.in_channel(DM_CHANNEL)]
    assert len(messages) >= 3
    assert all(len(m) <= 2000 for m in messages)
    assert all(m.count("```") % 2 == 0 for m in messages)  # every fence closed in its message
    joined = "\n".join(messages)
    assert all(f"Point {i}:" in joined for i in range(50))
    assert all(f"x{i} = {i}" in joined for i in range(400))


async def test_rate_limits_are_waited_out(bot: Callable[..., Any]) -> None:
    server, *_ = await bot(office_script=["Delivered after the 429."])
    server.fail_next[("POST", f"/channels/{DM_CHANNEL}/messages")] = "429"
    await server.say(DM_CHANNEL, ANN, "hi")
    await server.wait_for(lambda: server.in_channel(DM_CHANNEL), within=30)
    assert last(server, DM_CHANNEL) == "Delivered after the 429."
    posts = [r for r in server.requests if r == ("POST", f"/channels/{DM_CHANNEL}/messages")]
    assert len(posts) == 2  # refused once, retried


async def test_bots_webhooks_and_itself_are_ignored(bot: Callable[..., Any]) -> None:
    from tests.fake_discord import BOT_USER

    server, office, *_ = await bot()
    await server.say(DM_CHANNEL, BOT_USER, "my own message")
    await server.say(CHANNEL_WORK, OTHER_BOT, "another bot", mention_bot=True)
    hook_author = {**user("77", "Hooky"), "bot": True}
    await server.say(CHANNEL_WORK, hook_author, "a webhook", mention_bot=True, webhook_id="77")
    await server.say(DM_CHANNEL, ANN, "a person")
    await server.wait_for(lambda: server.in_channel(DM_CHANNEL))
    await asyncio.sleep(0.2)
    assert len(office.prompts) == 1 and "a person" in text_of(office.prompts[0])
    assert server.in_channel(CHANNEL_WORK) == []


def test_webhook_names_follow_discords_rules() -> None:
    assert webhook_username("Discord Clyde") != "Discord Clyde"
    assert "discord" not in webhook_username("mydiscordbot").lower().replace("\u200b", "x")
    assert len(webhook_username("x" * 200)) == 80


async def test_card_import_swipe_world_book_and_cast(bot: Callable[..., Any]) -> None:
    from tests.test_cards import V3, png_with

    server, _, character, core = await bot()
    aid, attachment = server.attachment("val.png", png_with({"ccv3": V3}))
    card_option = [
        {"type": 1, "name": "import", "options": [{"type": 11, "name": "card", "value": aid}]}
    ]
    token = await server.command(
        CHANNEL_ROLEPLAY, BOB, "character", card_option, resolved={"attachments": {aid: attachment}}
    )
    await server.wait_for(lambda: server.responses(token))
    assert "Only the bot's owners" in server.responses(token)[0].content
    token = await server.command(
        CHANNEL_ROLEPLAY, ANN, "character", card_option, resolved={"attachments": {aid: attachment}}
    )
    await server.wait_for(
        lambda: (
            "Imported" in (server.responses(token) or [None])[0].content
            if server.responses(token)
            else False
        )
    )
    assert "Imported Captain Valeria Storm" in server.responses(token)[0].content
    assert core.characters.find("captain valeria storm") is not None

    bad, junk = server.attachment("junk.png", b"not a card")
    token = await server.command(
        CHANNEL_ROLEPLAY,
        ANN,
        "character",
        [{"type": 1, "name": "import", "options": [{"type": 11, "name": "card", "value": bad}]}],
        admin=True,
        resolved={"attachments": {bad: junk}},
    )
    await server.wait_for(
        lambda: server.responses(token) and "could not" in server.responses(token)[0].content
    )

    # A two-character cast, then the scene's greeting and a swipe to its alternative.
    token = await server.command(
        CHANNEL_ROLEPLAY,
        ANN,
        "character",
        sub("set", opt("name", "Mira, Captain Reyes")),
        admin=True,
    )
    await server.wait_for(lambda: server.responses(token))
    assert "Mira and Captain Reyes take the stage" in server.responses(token)[0].content
    await core.actions.set_mode("discord", f"discord:{CHANNEL_ROLEPLAY}", "roleplay")
    greeting = await core.actions.open_scene("discord", f"discord:{CHANNEL_ROLEPLAY}", is_dm=False)
    assert greeting is not None
    await server.say(CHANNEL_ROLEPLAY, ANN, "Mira, hello!", mention_bot=True)
    await server.wait_for(
        lambda: server.in_channel(CHANNEL_ROLEPLAY) and "nods" in last(server, CHANNEL_ROLEPLAY)
    )
    answer = server.in_channel(CHANNEL_ROLEPLAY)[-1]
    token = await server.command(CHANNEL_ROLEPLAY, BOB, "swipe")
    await server.wait_for(lambda: server.responses(token) and server.responses(token)[0].content)
    assert "only one version" in server.responses(token)[0].content  # nothing to swipe yet
    token = await server.command(CHANNEL_ROLEPLAY, BOB, "regenerate")
    await server.wait_for(lambda: len(answer.edits) >= 2)
    token = await server.command(CHANNEL_ROLEPLAY, BOB, "swipe", [opt("direction", "back")])
    await server.wait_for(
        lambda: server.responses(token) and "version 1 of 2" in server.responses(token)[0].content
    )
    assert answer.content.startswith("*Mira nods.*")  # the earlier version, edited in place

    await core.library.import_world_book(
        "realm",
        {
            "entries": [
                {
                    "keys": ["harbor"],
                    "content": "The harbor is frozen.",
                    "enabled": True,
                    "insertion_order": 1,
                    "extensions": {},
                }
            ]
        },
    )
    token = await server.command(
        CHANNEL_ROLEPLAY, ANN, "character", sub("world", opt("name", "realm")), admin=True
    )
    await server.wait_for(lambda: server.responses(token))
    assert "World book realm attached" in server.responses(token)[0].content
    await server.say(CHANNEL_ROLEPLAY, ANN, "Mira, the harbor?", mention_bot=True)
    await server.wait_for(
        lambda: any("The harbor is frozen." in text_of(p) for p in character.prompts)
    )


async def test_a_failed_generation_becomes_an_apology(bot: Callable[..., Any]) -> None:
    from chat.core import APOLOGY
    from tests.test_core import FailingModel

    server, _, _, core = await bot()
    core.models.models["office"] = FailingModel()  # type: ignore[attr-defined]
    await server.say(DM_CHANNEL, ANN, "are you there?")
    await server.wait_for(
        lambda: server.in_channel(DM_CHANNEL) and last(server, DM_CHANNEL) == APOLOGY
    )
    message = server.in_channel(DM_CHANNEL)[-1]
    assert message.edits  # the half-written reply was edited into the apology


async def test_chat_command_continues_in_follow_ups(bot: Callable[..., Any]) -> None:
    long_answer = "\n".join(f"Step {i}: do the next thing carefully." for i in range(120))
    server, *_ = await bot(office_script=[long_answer])
    token = await server.command(CHANNEL_WORK, ANN, "chat", [opt("message", "a long plan")])
    await server.wait_for(
        lambda: (
            len(server.responses(token)) >= 2 and "Step 119:" in server.responses(token)[-1].content
        )
    )
    parts = [p.content for p in server.responses(token)]
    assert all(len(p) <= 2000 for p in parts)
    assert all(f"Step {i}:" in "\n".join(parts) for i in range(120))


async def test_admin_rights_follow_the_channel_overwrites_and_threads_use_the_parent(
    bot: Callable[..., Any],
) -> None:
    server, _, _, core = await bot()
    # A moderator whose role is denied Manage Channels in this one channel.
    token = await server.command(CHANNEL_LOCKED, BOB, "reset", admin=True)
    await server.wait_for(lambda: server.responses(token))
    assert "Manage Channels" in server.responses(token)[0].content
    token = await server.command(THREAD, BOB, "mode", [opt("mode", "roleplay")], admin=True)
    await server.wait_for(lambda: server.responses(token))
    assert "roleplay mode" in server.responses(token)[0].content
    conv = await core.conversations.get("discord", f"discord:{THREAD}")
    assert conv.mode == "roleplay"


async def test_typed_commands_get_a_pointer_and_non_owners_cannot_import_by_dm(
    bot: Callable[..., Any],
) -> None:
    from tests.test_cards import V3, png_with

    server, office, _, core = await bot()
    await server.say(CHANNEL_WORK, BOB, "/reset everything", mention_bot=True)
    await server.wait_for(lambda: server.in_channel(CHANNEL_WORK))
    assert "slash commands" in last(server, CHANNEL_WORK) and office.prompts == []
    aid, attachment = server.attachment("val.png", png_with({"ccv3": V3}))
    option = [
        {"type": 1, "name": "import", "options": [{"type": 11, "name": "card", "value": aid}]}
    ]
    token = await server.command(
        DM_CHANNEL, BOB, "character", option, resolved={"attachments": {aid: attachment}}
    )
    await server.wait_for(lambda: server.responses(token))
    assert "Only the bot's owners" in server.responses(token)[0].content
    assert core.characters.find("Captain Valeria Storm") is None


async def test_a_refused_send_does_not_cost_the_reply_it_is_stored_then_delivered(
    bot: Callable[..., Any], store: Store
) -> None:
    server, _, _, core = await bot(office_script=["Stored first, shown later."])
    server.forbidden_until = time.monotonic() + 2.0
    await server.say(CHANNEL_WORK, ANN, "Hello?", mention_bot=True)
    conv = await core.conversations.get("discord", f"discord:{CHANNEL_WORK}")
    assert await stored_replies(store, conv.id) == ["Stored first, shown later."]
    assert time.monotonic() < server.forbidden_until  # stored while sends were refused
    await server.wait_for(lambda: server.in_channel(CHANNEL_WORK), 30)
    assert [p.content for p in server.in_channel(CHANNEL_WORK)] == ["Stored first, shown later."]


async def test_memory_commands_and_edits_and_deletions_follow_the_channel(
    bot: Callable[..., Any],
) -> None:
    server, office, _, core = await bot(office_script=["Ann: Noted.", "Sure.", "Right."])
    conv = await core.conversations.get("discord", f"discord:{CHANNEL_WORK}")
    first = await server.say(CHANNEL_WORK, ANN, "the budget is 3,000", mention_bot=True)
    await server.wait_for(lambda: server.in_channel(CHANNEL_WORK))
    assert await stored_replies(core.store, conv.id) == ["Noted."]  # the name tag is cleaned
    aside = await server.say(CHANNEL_WORK, BOB, "my password is hunter2")
    await server.edit(CHANNEL_WORK, first, f"<@{APP_ID}> the budget is 4,500")
    await server.delete(CHANNEL_WORK, aside)

    async def stored() -> list[str]:
        return [m.text for m in await core.store.messages.history(conv.id)]

    deadline = time.monotonic() + 20
    while "the budget is 4,500" not in await stored() or "my password is hunter2" in (
        await stored()
    ):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)

    token = await server.command(CHANNEL_WORK, BOB, "remember", [opt("fact", "Bob is boss")])
    await server.wait_for(lambda: server.responses(token))
    assert "Manage Channels" in server.responses(token)[0].content
    token = await server.command(
        CHANNEL_WORK, ANN, "remember", [opt("fact", "The client is Globex.")], admin=True
    )
    await server.wait_for(lambda: server.responses(token))
    assert "I will remember that (fact 1)" in server.responses(token)[0].content
    token = await server.command(CHANNEL_WORK, BOB, "memory")
    await server.wait_for(
        lambda: any("1. The client is Globex." in r.content for r in server.responses(token))
    )
    assert all(r.ephemeral for r in server.responses(token))

    await server.say(CHANNEL_WORK, ANN, "and the deadline?", mention_bot=True)
    await server.wait_for(lambda: len(office.prompts) == 2)
    prompt = text_of(office.prompts[-1])
    assert "the budget is 4,500" in prompt and "3,000" not in prompt
    assert "hunter2" not in prompt  # deleted: left out of the context
    assert "1. The client is Globex." in prompt

    token = await server.command(
        CHANNEL_WORK, ANN, "forget", [{"type": 4, "name": "number", "value": 1}], admin=True
    )
    await server.wait_for(lambda: server.responses(token))
    assert "Forgotten: The client is Globex." in server.responses(token)[0].content
    assert len(office.prompts) == 2  # no edit or deletion was answered


async def test_note_persona_and_continue_steer_the_scene(bot: Callable[..., Any]) -> None:
    server, office, character, core = await bot(
        office_script=["A first part.", "And a second part."],
        character_script=["*Mira bows to the knight.*"],
    )
    await server.say(CHANNEL_WORK, ANN, "write two parts", mention_bot=True)
    await server.wait_for(
        lambda: server.in_channel(CHANNEL_WORK) and last(server, CHANNEL_WORK) == "A first part."
    )
    shown = server.in_channel(CHANNEL_WORK)[-1]
    token = await server.command(CHANNEL_WORK, ANN, "continue")
    await server.wait_for(lambda: shown.content == "A first part.And a second part.")
    assert server.in_channel(CHANNEL_WORK)[-1] is shown  # the same message grew
    # The command's own response follows the reply's last edit.
    await server.wait_for(lambda: "Done" in server.responses(token)[0].content)

    token = await server.command(CHANNEL_WORK, BOB, "note", [opt("text", "Be brief.")])
    await server.wait_for(lambda: server.responses(token))
    assert "Manage Channels" in server.responses(token)[0].content
    token = await server.command(CHANNEL_WORK, ANN, "note", [opt("text", "Be brief.")], admin=True)
    await server.wait_for(lambda: server.responses(token))
    assert "Author's note set" in server.responses(token)[0].content
    await server.say(CHANNEL_WORK, ANN, "next", mention_bot=True)
    await server.wait_for(lambda: len(office.prompts) == 3)
    assert "[Author's note: Be brief.]" in text_of(office.prompts[-1])

    token = await server.command(CHANNEL_WORK, BOB, "summarize", [opt("count", 2)])
    await server.wait_for(lambda: len(office.prompts) == 4)
    assert "Summarize this part of a team chat" in text_of(office.prompts[-1])
    await server.wait_for(lambda: server.responses(token) and server.responses(token)[0].content)

    await core.actions.set_mode("discord", f"discord:{CHANNEL_ROLEPLAY}", "roleplay")
    token = await server.command(
        CHANNEL_ROLEPLAY, BOB, "persona", [opt("text", "Galahad: a weary knight")]
    )
    await server.wait_for(lambda: server.responses(token))
    assert "you play as Galahad" in server.responses(token)[0].content
    await server.say(CHANNEL_ROLEPLAY, BOB, "Mira, I need a room.")
    await server.wait_for(lambda: character.prompts)
    prompt = text_of(character.prompts[-1])
    assert "About Galahad: a weary knight" in prompt
    assert "\nGalahad:" in character.stops[-1]  # the persona's name is the player's name


# -- a busy server: deadlines, commands beside answers in flight, exactly once ----------------


async def test_commands_are_acknowledged_in_time_while_an_answer_streams(
    bot: Callable[..., Any],
) -> None:
    server, _, character, core = await bot(character_script=["*Mira pours the ale.*"])
    key = f"discord:{CHANNEL_ROLEPLAY}"
    await core.actions.set_mode("discord", key, "roleplay")
    character.gate = asyncio.Event()
    await server.say(CHANNEL_ROLEPLAY, ANN, "Mira, an ale!", mention_bot=True)
    await server.wait_for(lambda: character.prompts)  # the answer is generating, held
    number = [{"type": 4, "name": "number", "value": 1}]
    tokens = [
        await server.command(
            CHANNEL_ROLEPLAY, BOB, "remember", [opt("fact", "Ale is free.")], admin=True
        ),
        await server.command(CHANNEL_ROLEPLAY, BOB, "note", [opt("text", "Short.")], admin=True),
        await server.command(CHANNEL_ROLEPLAY, BOB, "persona", [opt("text", "Gal: a knight")]),
        await server.command(CHANNEL_ROLEPLAY, BOB, "swipe"),
        await server.command(CHANNEL_ROLEPLAY, BOB, "forget", number, admin=True),
        await server.command(
            CHANNEL_ROLEPLAY, BOB, "character", sub("world", opt("name", "off")), admin=True
        ),
        await server.command(CHANNEL_ROLEPLAY, BOB, "mode", [opt("mode", "roleplay")], admin=True),
        await server.command(CHANNEL_ROLEPLAY, ANN, "reset", admin=True),
    ]
    await asyncio.sleep(3.5)  # past Discord's deadline, with the answer still held
    acknowledged = {c["token"] for c in server.callbacks}
    assert set(tokens) <= acknowledged and server.late_interactions == []
    character.gate.set()
    reset = tokens[-1]
    await server.wait_for(
        lambda: any("fresh conversation" in r.content for r in server.responses(reset))
    )
    greetings = lambda: [  # noqa: E731
        p for p in server.in_channel(CHANNEL_ROLEPLAY) if "Welcome to the Lantern Inn" in p.content
    ]
    await server.wait_for(lambda: len(greetings()) == 2)  # the scene opened again after /reset
    posted = server.in_channel(CHANNEL_ROLEPLAY)
    assert posted.index(next(p for p in posted if p.content == "*Mira pours the ale.*")) < (
        posted.index(greetings()[1])
    )


async def test_regenerate_while_a_reply_streams_rewrites_that_reply_only(
    bot: Callable[..., Any], store: Store
) -> None:
    server, office, _, core = await bot(
        office_script=["First answer.", "Second answer.", "Second, rewritten."]
    )
    await server.say(CHANNEL_WORK, ANN, "one?", mention_bot=True)
    await server.wait_for(
        lambda: server.in_channel(CHANNEL_WORK) and last(server, CHANNEL_WORK) == "First answer."
    )
    first = server.in_channel(CHANNEL_WORK)[0]
    office.gate = asyncio.Event()
    await server.say(CHANNEL_WORK, ANN, "two?", mention_bot=True)
    await server.wait_for(lambda: len(office.prompts) == 2)  # R2 is being written
    await server.command(CHANNEL_WORK, BOB, "regenerate")
    await asyncio.sleep(0.3)
    office.gate.set()
    await server.wait_for(
        lambda: any(p.content == "Second, rewritten." for p in server.in_channel(CHANNEL_WORK))
    )
    await asyncio.sleep(0.3)
    assert first.content == "First answer." and "Second" not in " ".join(first.edits)
    second = server.in_channel(CHANNEL_WORK)[1]
    assert second.content == "Second, rewritten." and len(server.in_channel(CHANNEL_WORK)) == 2
    conv = await core.conversations.get("discord", f"discord:{CHANNEL_WORK}")
    shown = {m.text: m.platform_message_id for m in await store.messages.history(conv.id)}
    assert shown["First answer."] == first.id and shown["Second, rewritten."] == second.id


async def test_continue_while_a_reply_streams_grows_that_reply_only(
    bot: Callable[..., Any],
) -> None:
    server, office, *_ = await bot(office_script=["First answer.", "Second answer.", " More."])
    await server.say(CHANNEL_WORK, ANN, "one?", mention_bot=True)
    await server.wait_for(
        lambda: server.in_channel(CHANNEL_WORK) and last(server, CHANNEL_WORK) == "First answer."
    )
    first = server.in_channel(CHANNEL_WORK)[0]
    office.gate = asyncio.Event()
    await server.say(CHANNEL_WORK, ANN, "two?", mention_bot=True)
    await server.wait_for(lambda: len(office.prompts) == 2)
    await server.command(CHANNEL_WORK, BOB, "continue")
    await asyncio.sleep(0.3)
    office.gate.set()
    await server.wait_for(
        lambda: any(p.content == "Second answer. More." for p in server.in_channel(CHANNEL_WORK))
    )
    assert first.content == "First answer." and "Second" not in " ".join(first.edits)
    assert len(server.in_channel(CHANNEL_WORK)) == 2


async def test_a_message_deleted_while_it_waits_gets_no_answer(
    bot: Callable[..., Any], store: Store
) -> None:
    server, office, _, core = await bot(office_script=["For Ann.", "For Bob."])
    office.gate = asyncio.Event()
    await server.say(CHANNEL_WORK, ANN, "first question", mention_bot=True)
    await server.wait_for(lambda: office.prompts)
    bobs = await server.say(CHANNEL_WORK, BOB, "second question", mention_bot=True)
    conv = await core.conversations.get("discord", f"discord:{CHANNEL_WORK}")

    async def stored() -> bool:
        return any(m.text == "second question" for m in await store.messages.history(conv.id))

    deadline = time.monotonic() + 10
    while not await stored():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await server.delete(CHANNEL_WORK, bobs)
    await asyncio.sleep(0.3)
    office.gate.set()
    await server.wait_for(lambda: server.in_channel(CHANNEL_WORK))
    await asyncio.sleep(0.5)
    assert [p.content for p in server.in_channel(CHANNEL_WORK)] == ["For Ann."]
    assert len(office.prompts) == 1


async def test_bulk_deletions_leave_the_context(bot: Callable[..., Any]) -> None:
    server, office, *_ = await bot()
    asides = [
        await server.say(CHANNEL_WORK, BOB, "my pin is 1234"),
        await server.say(CHANNEL_WORK, BOB, "and my password is hunter2"),
    ]
    await server.say(CHANNEL_WORK, ANN, "noted?", mention_bot=True)
    await server.wait_for(lambda: office.prompts)
    assert "hunter2" in text_of(office.prompts[-1])
    await server.delete_bulk(CHANNEL_WORK, asides)  # a moderator's purge
    await asyncio.sleep(0.5)
    await server.say(CHANNEL_WORK, ANN, "and now?", mention_bot=True)
    await server.wait_for(lambda: len(office.prompts) == 2)
    prompt = text_of(office.prompts[-1])
    assert "hunter2" not in prompt and "1234" not in prompt and "noted?" in prompt


async def test_catch_up_reads_from_the_newest_message_stored_before_the_connection(
    bot: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from chat.recovery import Recovery

    server, _office, _, _core = await bot()
    await server.say(CHANNEL_WORK, ANN, "hello", mention_bot=True)
    await server.wait_for(lambda: server.in_channel(CHANNEL_WORK))
    adapter, task = bot.running[0]  # type: ignore[attr-defined]
    await adapter.stop()
    await asyncio.wait_for(task, 10)
    await server.say(CHANNEL_WORK, BOB, "are you back?", mention_bot=True, offline=True)
    # Recovery takes a while; a live message arrives and is stored meanwhile.
    live_stored = asyncio.Event()
    plan = Recovery.plan

    async def slow_plan(self: Recovery, platform: str) -> Any:
        await asyncio.wait_for(live_stored.wait(), 20)
        return await plan(self, platform)

    monkeypatch.setattr(Recovery, "plan", slow_plan)
    _server2, office2, _, core2 = await bot()
    await server.identified.wait()
    await server.say(CHANNEL_WORK, ANN, "just chatting")  # live, not a mention
    conv = await core2.conversations.get("discord", f"discord:{CHANNEL_WORK}")
    deadline = time.monotonic() + 10
    while not any(m.text == "just chatting" for m in await core2.store.messages.history(conv.id)):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    live_stored.set()
    await server.wait_for(lambda: office2.prompts, within=20)
    assert "are you back?" in text_of(office2.prompts[-1])


async def test_ping_answers_pong_and_the_uptime(bot: Callable[..., Any]) -> None:
    server, *_ = await bot()
    assert "ping" in {c["name"] for c in server.commands[GUILD]}
    token = await server.command(CHANNEL_WORK, BOB, "ping")
    await server.wait_for(lambda: server.responses(token))
    answer = server.responses(token)[0]
    assert answer.ephemeral and answer.content.startswith("pong — up for 0 min")


async def test_posted_documents_are_read_listed_cited_and_forgotten(
    bot: Callable[..., Any],
) -> None:
    from tests.document_files import docx_file, pdf
    from tests.test_documents import PAGES, documents_block

    server, office, _, core = await bot(office_script=["Ninety days [1].", "It does not say."])
    files = [
        server.attachment("contract.pdf", pdf(PAGES))[1],
        server.attachment("minutes.docx", docx_file(["The board met on Tuesday."]))[1],
    ]
    posted = await server.say(CHANNEL_WORK, ANN, "", attachments=files)
    await server.wait_for(lambda: server.in_channel(CHANNEL_WORK))
    await server.say(CHANNEL_WORK, BOB, "", attachments=[server.attachment("a.txt", b"Milk.")[1]])
    await server.wait_for(lambda: len(server.in_channel(CHANNEL_WORK)) == 2)
    said = {m.reference: m.content for m in server.in_channel(CHANNEL_WORK)}
    assert said[posted].startswith("Read contract.pdf (PDF, 4 pages")
    assert "\nRead minutes.docx (DOCX, 1 passage)" in said[posted]
    assert any(c.startswith("Read a.txt (TEXT, 1 passage)") for c in said.values())
    token = await server.command(CHANNEL_WORK, BOB, "docs", sub("list"))
    await server.wait_for(lambda: server.responses(token))
    listing = server.responses(token)[0].content
    assert "1. contract.pdf (PDF, 4 pages" in listing and "3. a.txt" in listing

    await server.say(CHANNEL_WORK, ANN, "what is the notice period?", mention_bot=True)
    await server.wait_for(lambda: len(server.in_channel(CHANNEL_WORK)) == 3)
    assert "[1] contract.pdf, page 3:" in documents_block(office.prompts[-1])
    assert last(server, CHANNEL_WORK) == "Ninety days [1].\n\nSources: [1] contract.pdf, page 3"

    # Another channel asks the same: nothing of this one's documents.
    await server.say(DM_CHANNEL, ANN, "what is the notice period?")
    await server.wait_for(lambda: len(office.prompts) == 2)
    assert "ninety" not in text_of(office.prompts[-1]).lower()

    token = await server.command(CHANNEL_WORK, ANN, "ask", [opt("question", "Who is the CEO?")])
    await server.wait_for(lambda: server.responses(token))
    assert (
        server.responses(token)[0].content
        == "The documents here say nothing I can find about that."
    )
    assert len(office.prompts) == 2  # no model call for it

    token = await server.command(CHANNEL_WORK, BOB, "docs", sub("forget", opt("number", 1)))
    await server.wait_for(lambda: server.responses(token))
    assert "Only whoever posted it" in server.responses(token)[0].content
    token = await server.command(CHANNEL_WORK, BOB, "docs", sub("forget", opt("number", 3)))
    await server.wait_for(lambda: server.responses(token))
    assert server.responses(token)[0].content.startswith("Forgot a.txt")
    await server.delete(CHANNEL_WORK, posted)  # the PDF and the DOCX go with their message
    conv = await core.conversations.get("discord", f"discord:{CHANNEL_WORK}")

    async def left() -> list[str]:
        return [d.name for d in await core.documents.of(conv.id)]

    deadline = time.monotonic() + 20
    while await left():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_a_reminder_pings_its_owner_only_and_recurs(bot: Callable[..., Any]) -> None:
    server, *_ = await bot(reminders=ReminderSettings(poll_s=0.2, min_interval_s=1))
    token = await server.command(
        CHANNEL_WORK, ANN, "remind", [opt("request", "in 2 seconds ping @everyone about it")]
    )
    await server.wait_for(lambda: server.responses(token))
    assert "I will remind you" in server.responses(token)[0].content

    def reminders(what: str) -> list[Any]:
        return [p for p in server.in_channel(CHANNEL_WORK) if f"Reminder: {what}" in p.content]

    await server.wait_for(lambda: reminders("ping"), within=10)
    shown = reminders("ping")[0]
    assert shown.content == "<@11> ⏰ Reminder: ping @everyone about it"
    # Only Ann is pinged: not @everyone, not a role, whatever the text says.
    mentions = shown.allowed_mentions or {}
    assert mentions.get("parse") == [] and [str(u) for u in mentions.get("users", [])] == ["11"]
    token = await server.command(
        CHANNEL_WORK, BOB, "remind", [opt("request", "every 2 seconds stretch")]
    )
    await server.wait_for(lambda: len(reminders("stretch")) >= 2, within=15)
    token = await server.command(CHANNEL_WORK, BOB, "reminders", sub("cancel", opt("number", 1)))
    await server.wait_for(lambda: server.responses(token))
    assert server.responses(token)[0].content == "Cancelled: stretch"
    assert len(reminders("ping")) == 1


async def test_a_reminder_due_while_the_bot_is_stopped_comes_once_at_start(
    bot: Callable[..., Any],
) -> None:
    fast = ReminderSettings(poll_s=0.2, late_after_s=2)
    server, *_ = await bot(reminders=fast)
    token = await server.command(CHANNEL_WORK, ANN, "remind", [opt("request", "in 2 seconds x")])
    await server.wait_for(lambda: server.responses(token))
    adapter, task = bot.running[-1]  # type: ignore[attr-defined]
    await adapter.stop()
    await asyncio.wait_for(task, 10)
    await asyncio.sleep(4)
    await bot(reminders=fast)
    await server.wait_for(lambda: any("Reminder: x" in p.content for p in server.posted), 10)
    await asyncio.sleep(1)
    shown = [p for p in server.in_channel(CHANNEL_WORK) if "Reminder: x" in p.content]
    assert len(shown) == 1 and "(Late: this was due" in shown[0].content
