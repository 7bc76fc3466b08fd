"""Typed, frozen settings: one TOML file plus environment variables, loaded once at start-up.

Secrets (platform tokens) come only from the environment. ``BOT_DATABASE_URL`` overrides the
database, ``BOT_CONFIG`` selects the file when ``--config`` is not given.  Nothing here is a module
global: :func:`load_settings` returns a :class:`Settings` that callers pass explicitly.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

from ai_model.config import ModelSettings, SamplingSettings
from chat.access import AccessSettings, parse_access
from chat.documents.limits import DocumentSettings
from chat.reminders.limits import ReminderSettings
from chat.roleplay.characters import (
    CardError,
    Character,
    card_from_fields,
    character_from_card,
    shipped_characters,
)
from chat.setting_checks import (
    SettingsError,
    build,
    check_character,
    check_shards,
    checked,
    count,
    duration,
    expect_table,
    host_port,
    owner_ids,
    suggest,
    webhook_secret,
)
from chat.tools.rounds import ToolSettings

__all__ = [
    "MODES",
    "ROLES",
    "ROLE_FOR_MODE",
    "Mode",
    "PlatformSettings",
    "Settings",
    "SettingsError",
    "host_port",
    "load_settings",
    "parse_mode",
    "parse_settings",
]

Mode = Literal["roleplay", "work"]
MODES: tuple[Mode, ...] = ("roleplay", "work")
ROLES = ("character", "office")
# Which model role answers in which channel mode.
ROLE_FOR_MODE: dict[Mode, str] = {"roleplay": "character", "work": "office"}

DEFAULT_CONFIG_FILE = "bot.toml"
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///data/bot.db"
DEFAULT_CHARACTER = "Mira"
CHARACTER_KEYS = {
    "description",
    "greeting",
    "personality",
    "scenario",
    "mes_example",
    "system_prompt",
    "post_history_instructions",
    "alternate_greetings",
    "talkativeness",
    "sampling",
}
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful, concise office assistant in a team chat. Answer clearly and politely. "
    "When several people talk to you, each of their messages starts with their name."
)


def parse_mode(value: str) -> Mode | None:
    """The mode named by ``value`` (case-insensitive), or None if it names none."""
    for mode in MODES:
        if value.strip().lower() == mode:
            return mode
    return None


@dataclass(frozen=True, slots=True)
class PlatformSettings:
    """Per-platform behaviour: the mode a new channel gets and where the API lives."""

    default_mode: Mode = "work"
    dm_mode: Mode = "work"
    api_base_url: str | None = None
    # In roleplay channels, answer every message instead of only mentions, replies and names.
    roleplay_reply_all: bool = False
    # Discord: register slash commands in this guild (instant) instead of globally.
    guild_id: int | None = None
    # Discord: who may change the mode/character/reset besides Manage Channels holders.
    admin_role_ids: tuple[int, ...] = ()
    admin_user_ids: tuple[int, ...] = ()
    # Discord: avatar URLs for character webhook posts, by character name.
    character_avatars: Mapping[str, str] = field(default_factory=dict)
    # Discord sharding: how many shards the bot has in all, and which of them this process
    # runs (None: all).  Processes must run disjoint shard ids (README, "Scaling out").
    shard_count: int | None = None
    shard_ids: tuple[int, ...] | None = None
    # Telegram: receive updates by webhook at this public HTTPS URL instead of polling; the
    # bot listens on ``listen`` (host:port, behind the proxy that terminates TLS).
    webhook_url: str | None = None
    listen: str = "127.0.0.1:8443"
    token: str | None = field(default=None, repr=False)
    webhook_secret: str | None = field(default=None, repr=False)  # TELEGRAM_WEBHOOK_SECRET


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the bot needs, resolved from file, environment and defaults."""

    database_url: str = DEFAULT_DATABASE_URL
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    default_character: str = DEFAULT_CHARACTER
    # Characters defined in the settings file (shipped and imported cards are added at start-up).
    characters: Mapping[str, Character] = field(default_factory=dict)
    models: Mapping[str, ModelSettings] = field(
        default_factory=lambda: {role: ModelSettings() for role in ROLES}
    )
    platforms: Mapping[str, PlatformSettings] = field(
        default_factory=lambda: {
            name: PlatformSettings() for name in ("console", "discord", "telegram")
        }
    )
    config_path: Path | None = None
    # Who may change what every conversation shares (cards, world books): "platform:user id".
    owner_ids: frozenset[str] = frozenset()
    # Messages one user may send per minute; past it, one notice and then silence. 0: no limit.
    rate_limit: int = 20
    # Messages one conversation may have waiting for an answer; more get a notice instead.
    max_queued: int = 4
    # Messages one user may have waiting for the model at once, across all conversations.
    max_pending_per_user: int = 2
    # On SIGTERM/SIGINT, how long answers in flight may take to finish before the bot stops.
    shutdown_grace_s: int = 20
    # At start-up, messages received this many seconds ago or less that never got a complete
    # answer are answered; older ones get one "I was offline" notice (or nothing, when
    # offline_notice is false).
    recover_window: int = 3600
    offline_notice: bool = True
    # Discord: after a restart or a new session, messages missed per channel that are fetched.
    catch_up_limit: int = 50
    # Memory beyond the window: the rolling summary and the pinned facts may take this share of
    # the model's window (0 turns the summaries off; /remember facts still count against it).
    memory_budget: float = 0.10
    # Whether editing a message the bot already answered writes a new answer to it.
    regenerate_on_edit: bool = False
    # Where the author's note (/note) goes: this many messages from the end of the history.
    note_depth: int = 4
    # Who may use the bot (chat/access.py); without lists, everyone.
    access: AccessSettings = field(default_factory=AccessSettings)
    # Where /healthz, /readyz and /metrics are served ("host:port"); None: nowhere.
    metrics_listen: str | None = None
    # Files posted in work conversations (chat/documents): bounds and the prompt's share.
    documents: DocumentSettings = field(default_factory=DocumentSettings)
    # /remind (chat/reminders): caps, the shortest recurrence, delivery pacing.
    reminders: ReminderSettings = field(default_factory=ReminderSettings)
    # The office model's tools (chat/tools): where they are on, how many per reply.
    tools: ToolSettings = field(default_factory=ToolSettings)

    def platform(self, name: str) -> PlatformSettings:
        return self.platforms.get(name, PlatformSettings())

    @property
    def chat_platforms(self) -> bool:
        """Whether a Discord or Telegram token is set (without one, ``run`` opens the
        terminal chat)."""
        return any(self.platform(name).token for name in ("discord", "telegram"))

    def is_owner(self, platform: str, user_id: str) -> bool:
        """Listed in ``owner_ids``; the terminal chat is the machine's owner by definition."""
        return platform == "console" or f"{platform}:{user_id}" in self.owner_ids


def _mode(value: object, where: str) -> Mode:
    mode = parse_mode(value) if isinstance(value, str) else None
    if mode is None:
        raise SettingsError(f"{where} must be 'roleplay' or 'work', not {value!r}")
    return mode


def _model_settings(data: Mapping[str, Any], where: str) -> ModelSettings:
    data = dict(data)
    sampling = SamplingSettings()
    if "sampling" in data:
        sampling = build(
            SamplingSettings,
            expect_table(data.pop("sampling"), f"{where}.sampling"),
            f"{where}.sampling",
        )
    # TOML arrays arrive as lists; the frozen settings keep tuples so they stay hashable.
    sampling = replace(sampling, stop=tuple(sampling.stop))
    if isinstance(data.get("server_slots"), list):
        data["server_slots"] = tuple(data["server_slots"])
    model = build(ModelSettings, data, where, sampling=sampling)
    try:
        model.validate()
    except ValueError as exc:
        raise SettingsError(f"invalid value in [{where}]: {exc}") from exc
    return cast(ModelSettings, model)


def _documents(table: Mapping[str, Any]) -> DocumentSettings:
    # TOML integers are fine where a number of megabytes or seconds is a float.
    data = {
        k: float(v) if k.endswith(("_mb", "_seconds")) and type(v) is int else v
        for k, v in table.items()
    }
    documents = cast(DocumentSettings, build(DocumentSettings, data, "documents"))
    try:
        documents.validate()
    except ValueError as exc:
        raise SettingsError(f"invalid value in [documents]: {exc}") from exc
    return documents


def _reminders(table: Mapping[str, Any]) -> ReminderSettings:
    data = {k: float(v) if k == "poll_s" and type(v) is int else v for k, v in table.items()}
    reminders = cast(ReminderSettings, build(ReminderSettings, data, "reminders"))
    try:
        reminders.validate()
    except ValueError as exc:
        raise SettingsError(f"invalid value in [reminders]: {exc}") from exc
    return reminders


def _tools(table: Mapping[str, Any]) -> ToolSettings:
    tools = cast(ToolSettings, build(ToolSettings, dict(table), "tools"))
    try:
        tools.validate()
    except ValueError as exc:
        raise SettingsError(f"invalid value in [tools]: {exc}") from exc
    return tools


def parse_settings(
    raw: Mapping[str, Any], env: Mapping[str, str], config_path: Path | None = None
) -> Settings:
    """Turn a parsed TOML document plus environment into :class:`Settings`."""
    raw = dict(raw)
    bot = expect_table(raw.pop("bot", {}), "bot")
    models_raw = expect_table(raw.pop("models", {}), "models")
    platforms_raw = expect_table(raw.pop("platforms", {}), "platforms")
    chars_raw = expect_table(raw.pop("characters", {}), "characters")
    try:
        access = parse_access(expect_table(raw.pop("access", {}), "access"))
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    documents = _documents(expect_table(raw.pop("documents", {}), "documents"))
    reminders = _reminders(expect_table(raw.pop("reminders", {}), "reminders"))
    tools = _tools(expect_table(raw.pop("tools", {}), "tools"))
    if raw:
        raise SettingsError(f"unknown top-level table(s): {', '.join(sorted(raw))}")

    known_bot = {
        "database_url",
        "system_prompt",
        "default_character",
        "owner_ids",
        "rate_limit",
        "max_queued",
        "max_pending_per_user",
        "shutdown_grace_s",
        "recover_window",
        "offline_notice",
        "catch_up_limit",
        "memory_budget",
        "regenerate_on_edit",
        "note_depth",
        "metrics_listen",
    }
    if unknown := sorted(set(bot) - known_bot):
        raise SettingsError(
            f"unknown setting(s) in [bot]: {', '.join(suggest(unknown, known_bot))}"
        )
    limits: dict[str, Any] = {
        key: count(bot, key)
        for key in (
            "rate_limit",
            "max_queued",
            "max_pending_per_user",
            "shutdown_grace_s",
            "catch_up_limit",
            "note_depth",
        )
        if key in bot
    }
    if "recover_window" in bot:
        limits["recover_window"] = duration(bot["recover_window"], "recover_window")
    for key in ("offline_notice", "regenerate_on_edit"):
        if key in bot:
            if not isinstance(bot[key], bool):
                raise SettingsError(f"[bot] {key} must be true or false")
            limits[key] = bot[key]
    if "memory_budget" in bot:
        share = bot["memory_budget"]
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 0.5:
            raise SettingsError("[bot] memory_budget must be a share of the window from 0 to 0.5")
        limits["memory_budget"] = float(share)
    for key in ("max_queued", "max_pending_per_user"):
        if limits.get(key, 1) < 1:
            raise SettingsError(f"[bot] {key} must be at least 1")
    for key in ("database_url", "system_prompt", "default_character"):
        if key in bot:
            checked(Settings, key, bot[key], "bot")
    if "metrics_listen" in bot:
        limits["metrics_listen"] = host_port(bot["metrics_listen"], "[bot] metrics_listen")[2]

    models: dict[str, ModelSettings] = {}
    for role in ROLES:
        models[role] = _model_settings(
            expect_table(models_raw.pop(role, {}), f"models.{role}"), f"models.{role}"
        )
        # A remote engine's key, kept out of the settings file: BOT_OFFICE_API_KEY, ...
        if key := env.get(f"BOT_{role.upper()}_API_KEY", "").strip():
            models[role] = replace(models[role], api_key=key)
    if models_raw:
        raise SettingsError(
            f"unknown model role(s): {', '.join(sorted(models_raw))} (use character, office)"
        )

    characters: dict[str, Character] = {}
    for key, table in chars_raw.items():
        table = dict(expect_table(table, f"characters.{key}"))
        name = str(table.pop("name", key))
        if unknown := sorted(set(table) - CHARACTER_KEYS):
            raise SettingsError(f"unknown setting(s) in [characters.{key}]: {', '.join(unknown)}")
        check_character(table, f"characters.{key}")
        extensions: dict[str, Any] = {}
        if "talkativeness" in table:
            extensions["talkativeness"] = table.pop("talkativeness")
        if "sampling" in table:
            extensions["localbot"] = {"sampling": expect_table(table.pop("sampling"), key)}
        if "greeting" in table:
            table["first_mes"] = table.pop("greeting")
        try:
            char = character_from_card(card_from_fields(name, extensions=extensions, **table))
        except CardError as exc:
            raise SettingsError(f"[characters.{key}]: {exc}") from exc
        characters[char.name.lower()] = char

    token_env = {"discord": "DISCORD_TOKEN", "telegram": "TELEGRAM_BOT_TOKEN"}
    base_url_env = {"discord": "DISCORD_API_BASE_URL", "telegram": "TELEGRAM_BASE_URL"}
    platforms: dict[str, PlatformSettings] = {}
    for name in ("console", "discord", "telegram"):
        table = dict(expect_table(platforms_raw.pop(name, {}), f"platforms.{name}"))
        if "token" in table:
            raise SettingsError(
                f"[platforms.{name}] token: tokens are read from the environment only "
                f"({token_env.get(name, 'not applicable')}), remove it from the file"
            )
        for key in ("default_mode", "dm_mode"):
            if key in table:
                table[key] = _mode(table[key], f"platforms.{name}.{key}")
        for key in ("admin_role_ids", "admin_user_ids", "shard_ids"):
            if key in table:
                table[key] = checked(PlatformSettings, key, table[key], f"platforms.{name}")
        check_shards(table, f"platforms.{name}")
        if name in base_url_env and env.get(base_url_env[name]):
            table["api_base_url"] = env[base_url_env[name]]
        token = (env.get(token_env[name], "").strip() or None) if name in token_env else None
        secret = env.get("TELEGRAM_WEBHOOK_SECRET", "").strip() or None
        hook = webhook_secret(name, table, secret)
        platforms[name] = build(
            PlatformSettings, table, f"platforms.{name}", token=token, webhook_secret=hook
        )
    if platforms_raw:
        raise SettingsError(f"unknown platform(s): {', '.join(sorted(platforms_raw))}")

    database_url = env.get("BOT_DATABASE_URL") or bot.get("database_url", DEFAULT_DATABASE_URL)
    default_character = str(bot.get("default_character", DEFAULT_CHARACTER))
    known = {c.name.lower() for c in shipped_characters()} | set(characters)
    if default_character.lower() not in known:
        raise SettingsError(f"[bot] default_character {default_character!r} is not defined")
    return Settings(
        database_url=str(database_url),
        system_prompt=str(bot.get("system_prompt", DEFAULT_SYSTEM_PROMPT)),
        default_character=default_character,
        characters=characters,
        models=models,
        platforms=platforms,
        config_path=config_path,
        owner_ids=owner_ids(bot.get("owner_ids", [])),
        access=access,
        documents=documents,
        reminders=reminders,
        tools=tools,
        **limits,
    )


def load_settings(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Load settings from ``path`` (or ``BOT_CONFIG``, or ``./bot.toml`` if present) and env."""
    env = os.environ if env is None else env
    chosen = path or env.get("BOT_CONFIG")
    if chosen:
        config_path: Path | None = Path(chosen)
        if not Path(chosen).is_file():
            raise SettingsError(f"settings file not found: {chosen}")
    else:
        default = Path(DEFAULT_CONFIG_FILE)
        config_path = default if default.is_file() else None
    raw: dict[str, Any] = {}
    if config_path is not None:
        try:
            raw = tomllib.loads(config_path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"{config_path} is not valid TOML: {exc}") from exc
    return parse_settings(raw, env, config_path)
