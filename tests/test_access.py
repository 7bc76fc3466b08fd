"""[access]: who may use the bot, on the engine and through the real python-telegram-bot."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from sqlalchemy import text

from adapters.streaming import StreamLimits
from adapters.telegram import TelegramAdapter
from chat.access import REFUSED, Access, AccessSettings, Requester
from chat.core import ConversationCore
from chat.settings import PlatformSettings, Settings, SettingsError, parse_settings
from storage import Store
from tests.conftest import FixedModels
from tests.fake_telegram import FakeTelegram
from tests.scripted import ScriptedModel


def who(user: str = "1", key: str = "discord:10", dm: bool = False, **kw: object) -> Requester:
    platform = key.split(":")[0]
    return Requester(platform, user, key, dm, **kw)  # type: ignore[arg-type]


def test_block_beats_allow_owners_pass_and_lists_narrow_their_kind() -> None:
    rules = AccessSettings(
        allow_users=frozenset({"discord:1", "discord:2"}),
        allow_roles=frozenset({"77"}),
        block_users=frozenset({"discord:2"}),
        block_roles=frozenset({"66"}),
        allow_guilds=frozenset({"500"}),
        block_channels=frozenset({"discord:13"}),
        allow_dms=False,
    )
    access = Access(rules, lambda platform, user: (platform, user) == ("discord", "9"))
    assert access.permits(who("1", guild_id="500"))
    assert not access.permits(who("2", guild_id="500"))  # allowed and blocked: blocked
    assert access.permits(who("3", roles=("77",), guild_id="500"))  # by role
    assert not access.permits(who("1", roles=("66",), guild_id="500"))  # a blocked role
    assert not access.permits(who("4", guild_id="500"))  # neither listed nor a listed role
    assert not access.permits(who("1", guild_id="501"))  # another guild
    assert not access.permits(who("1", key="discord:13", guild_id="500"))  # a blocked channel
    assert not access.permits(who("1", key="discord:20", dm=True))  # DMs are off
    assert access.permits(who("9", key="discord:13", dm=True, roles=("66",)))  # an owner
    assert access.refused == 6
    everyone = Access(AccessSettings(), lambda _p, _u: False)
    assert everyone.permits(who("4")) and everyone.permits(who("4", dm=True))


def test_the_notice_is_for_dms_once_an_hour() -> None:
    now = [0.0]
    access = Access(AccessSettings(), lambda _p, _u: False, clock=lambda: now[0])
    assert access.notice(who("5", dm=False)) is None  # a group: nothing is posted
    assert access.notice(who("5", dm=True)) == REFUSED
    now[0] = 3599
    assert access.notice(who("5", dm=True)) is None
    now[0] = 3601
    assert access.notice(who("5", dm=True)) == REFUSED


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"block_users": ["bob"]}, "is not 'discord:<user id>'"),
        ({"allow_roles": ["admins"]}, "is not a Discord id"),
        ({"allow_channels": "discord:1"}, "must be a list"),
        ({"allow_dm": False}, "did you mean allow_dms"),
        ({"allow_dms": "no"}, "allow_dms = 'no': input should be a valid bool"),
    ],
)
def test_access_settings_are_checked(table: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        parse_settings({"access": table}, env={})


GROUP = -100700
ANN, BOB = 701, 702


async def test_telegram_refused_users_cost_nothing_and_hear_once_in_a_dm(
    telegram: FakeTelegram, settings: Settings, store: Store
) -> None:
    rules = parse_settings({"access": {"block_users": [f"telegram:{BOB}"]}}, env={}).access
    office = ScriptedModel(["Here you go."])
    character = ScriptedModel(["*Mira nods.*"])
    core = ConversationCore(
        replace(settings, access=rules),
        store,
        FixedModels({"office": office, "character": character}),
    )
    platform = PlatformSettings(token="123:TEST", api_base_url=telegram.base_url)
    adapter = TelegramAdapter(core, platform, poll_timeout=1, limits=StreamLimits(4096, 0.05, 10))
    task = asyncio.create_task(adapter.start())
    try:
        await telegram.wait_for(lambda: "setMyCommands" in telegram.methods())
        for n in range(2):
            telegram.push(BOB, BOB, "Bob", f"hello {n}")
        telegram.push(GROUP, BOB, "Bob", "@lantern_bot answer me", chat_type="supergroup")
        telegram.push(GROUP, BOB, "Bob", "/reset", chat_type="supergroup")
        telegram.push(GROUP, ANN, "Ann", "@lantern_bot and me?", chat_type="supergroup")
        await telegram.wait_for(lambda: telegram.bot_messages(GROUP))
        await telegram.wait_for(lambda: telegram.bot_messages(BOB))
        await asyncio.sleep(0.5)
        assert [m.text for m in telegram.bot_messages(BOB)] == [REFUSED]  # once, not twice
        assert [m.text for m in telegram.bot_messages(GROUP)] == ["Here you go."]  # Ann only
        assert len(office.prompts) == 1  # Bob cost no model time
    finally:
        await adapter.stop()
        await asyncio.wait_for(task, 10)
    async with store.engine.connect() as conn:
        rows = await conn.execute(text("SELECT author_id, text FROM messages WHERE role = 'user'"))
        stored = [tuple(r) for r in rows]
    assert stored and all(author == str(ANN) for author, _ in stored)  # nothing of Bob's


async def test_discord_roles_and_guilds_decide_through_the_real_client(
    settings: Settings, store: Store
) -> None:
    from adapters.discord import DiscordAdapter
    from tests.fake_discord import (
        CHANNEL_WORK,
        DM_CHANNEL,
        GUILD,
        MOD_ROLE,
        FakeDiscord,
        user,
    )

    server = FakeDiscord()
    await server.start()
    # Only the mods role may use the bot, only in this guild, and not by DM.
    rules = parse_settings(
        {"access": {"allow_roles": [MOD_ROLE], "allow_guilds": [GUILD], "allow_dms": False}},
        env={},
    ).access
    office = ScriptedModel(["Here you go."])
    core = ConversationCore(
        replace(settings, access=rules), store, FixedModels({"office": office, "character": office})
    )
    platform = PlatformSettings(token="TEST", api_base_url=server.api_url, guild_id=int(GUILD))
    adapter = DiscordAdapter(core, platform, limits=StreamLimits(2000, 0.05, 10))
    task = asyncio.create_task(adapter.start())
    ann, bob = user("11", "Ann"), user("12", "Bob")
    try:
        await asyncio.wait_for(adapter.ready.wait(), 20)
        await server.say(CHANNEL_WORK, bob, "answer me", mention_bot=True)  # no mods role
        await server.say(DM_CHANNEL, bob, "hello by DM")
        token = await server.command(CHANNEL_WORK, bob, "reset", [])
        await server.say(CHANNEL_WORK, ann, "and me?", mention_bot=True, admin=True)  # a mod
        await server.wait_for(lambda: server.responses(token))
        await server.wait_for(lambda: server.in_channel(CHANNEL_WORK))
        await server.wait_for(lambda: server.in_channel(DM_CHANNEL))
        await asyncio.sleep(0.5)
        assert [m.content for m in server.in_channel(CHANNEL_WORK)] == ["Here you go."]
        assert [m.content for m in server.in_channel(DM_CHANNEL)] == [REFUSED]
        refusal = server.responses(token)[0]
        assert refusal.ephemeral and refusal.content == REFUSED
        assert len(office.prompts) == 1  # Bob cost no model time
    finally:
        await adapter.stop()
        await asyncio.wait_for(task, 10)
        await server.stop()
    async with store.engine.connect() as conn:
        rows = await conn.execute(text("SELECT author_id FROM messages WHERE role = 'user'"))
        assert {r[0] for r in rows} == {"11"}  # nothing of Bob's was stored
