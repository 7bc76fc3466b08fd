"""How single settings values are checked: types (pydantic, strict), tables, durations,
addresses, owner lists and webhook secrets.  Each failure is one :class:`SettingsError` line
that names the table, the key, what was given and what is expected."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import fields
from typing import Annotated, Any, get_type_hints

from pydantic import Field, TypeAdapter, ValidationError

from ai_model.config import SamplingSettings


class SettingsError(Exception):
    """The settings file or environment is invalid; the message is meant for the user."""


def expect_table(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SettingsError(f"[{where}] must be a table")
    return value


_CHECKERS: dict[tuple[type[Any], str], TypeAdapter[Any]] = {}


def _checker(cls: type[Any], name: str) -> TypeAdapter[Any]:
    key = (cls, name)
    if key not in _CHECKERS:
        _CHECKERS[key] = TypeAdapter(get_type_hints(cls)[name])
    return _CHECKERS[key]


def checked(cls: type[Any], name: str, value: Any, where: str) -> Any:
    """``value`` as the field ``name`` of ``cls`` declares it, or a :class:`SettingsError`
    that names the setting, what it got and what it takes.  Strict: ``"false"`` is no boolean
    and ``"8191"`` no number (TOML has both); arrays become tuples."""
    if isinstance(value, list):
        value = tuple(value)
    try:
        return _checker(cls, name).validate_python(value, strict=True)
    except ValidationError as exc:
        error = exc.errors()[0]
        at = "".join(f"[{p}]" for p in error["loc"])
        raise SettingsError(
            f"[{where}] {name}{at} = {error['input']!r}: {error['msg'].lower()}"
        ) from None


def build(cls: type[Any], data: Mapping[str, Any], where: str, **extra: Any) -> Any:
    """Build a frozen dataclass from a TOML table: unknown keys and values of the wrong type
    are refused with a message naming them."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise SettingsError(
            f"unknown setting(s) in [{where}]: {', '.join(suggest(unknown, set(known)))}"
        )
    values = {name: checked(cls, name, value, where) for name, value in data.items()}
    try:
        obj = cls(**values, **extra)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"invalid value in [{where}]: {exc}") from exc
    return obj


_CHARACTER_TYPES: dict[str, TypeAdapter[Any]] = {
    "alternate_greetings": TypeAdapter(tuple[str, ...]),
    "talkativeness": TypeAdapter(Annotated[float, Field(ge=0, le=1)]),
}
_TEXT = TypeAdapter(str)


def check_character(table: Mapping[str, Any], where: str) -> None:
    """The types of a character defined in the file (a card's fields are text; imported
    cards are forgiving, a settings file is not)."""
    for name, value in table.items():
        if name == "sampling":
            sampling = expect_table(value, f"{where}.sampling")
            if unknown := sorted(set(sampling) - {f.name for f in fields(SamplingSettings)}):
                raise SettingsError(f"unknown setting(s) in [{where}.sampling]: {unknown}")
            for option, given in sampling.items():
                checked(SamplingSettings, option, given, f"{where}.sampling")
            continue
        checker = _CHARACTER_TYPES.get(name, _TEXT)
        try:
            given = tuple(value) if isinstance(value, list) else value
            checker.validate_python(given, strict=True)
        except ValidationError as exc:
            error = exc.errors()[0]
            raise SettingsError(
                f"[{where}] {name} = {error['input']!r}: {error['msg'].lower()}"
            ) from None


def host_port(value: object, where: str) -> tuple[str, int, str]:
    """``"127.0.0.1:9464"`` → (host, port, the text), or a :class:`SettingsError`."""
    host, _, port = str(value).rpartition(":") if isinstance(value, str) else ("", "", "")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsError(f'{where} must be "host:port" like "127.0.0.1:9464", not {value!r}')
    return host.strip("[]"), int(port), str(value)


_SECRET_CHARS = re.compile(r"[A-Za-z0-9_-]{1,256}")


def webhook_secret(name: str, table: dict[str, Any], secret: str | None) -> str | None:
    """Check the webhook keys of ``[platforms.<name>]``; the secret it needs, if any."""
    where = f"[platforms.{name}]"
    if name != "telegram":
        for key in ("webhook_url", "listen"):
            if key in table:
                raise SettingsError(f"{where} {key}: webhooks are for Telegram only")
        return None
    if "listen" in table:
        host_port(table["listen"], f"{where} listen")
    url = table.get("webhook_url")
    if url is None:
        return None
    if not isinstance(url, str) or not url.startswith("https://"):
        raise SettingsError(f"{where} webhook_url must be an https:// URL, not {url!r}")
    # Without a secret anyone who finds the URL could post updates as Telegram.
    if secret is None or not _SECRET_CHARS.fullmatch(secret):
        raise SettingsError(
            f"{where} webhook_url needs TELEGRAM_WEBHOOK_SECRET in the environment: "
            "1-256 characters of A-Z, a-z, 0-9, _ and -"
        )
    return secret


def count(table: Mapping[str, Any], key: str) -> Any:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise SettingsError(f"[bot] {key} must be a whole number >= 0, not {value!r}")
    return value


def check_shards(table: Mapping[str, Any], where: str) -> None:
    count, ids = table.get("shard_count"), table.get("shard_ids")
    if count is not None and (not isinstance(count, int) or count < 1):
        raise SettingsError(f"[{where}] shard_count must be a whole number >= 1")
    if ids is not None:
        if count is None:
            raise SettingsError(f"[{where}] shard_ids needs shard_count")
        if not ids or any(i < 0 or i >= count for i in ids) or len(set(ids)) != len(ids):
            raise SettingsError(
                f"[{where}] shard_ids must be distinct numbers from 0 to {count - 1}"
            )


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(value: object, key: str) -> int:
    """Seconds, from a whole number of seconds or a string like "90s", "30m", "1h", "2d"."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    text = str(value).strip().lower()
    if text[-1:] in _UNITS and text[:-1].strip().isdigit():
        return int(text[:-1]) * _UNITS[text[-1]]
    raise SettingsError(f'[bot] {key} must be seconds or a duration like "1h", not {value!r}')


def owner_ids(value: object) -> frozenset[str]:
    """``["discord:123", "telegram:456"]`` → the set, each entry checked."""
    if not isinstance(value, list):
        raise SettingsError('[bot] owner_ids must be a list like ["discord:123"]')
    owners = set()
    for entry in value:
        platform, _, user = str(entry).partition(":")
        if platform not in ("discord", "telegram", "console") or not user.strip():
            raise SettingsError(
                f"[bot] owner_ids: {entry!r} is not 'discord:<user id>' or 'telegram:<user id>'"
            )
        owners.add(f"{platform}:{user.strip()}")
    return frozenset(owners)


def suggest(unknown: list[str], known: set[str]) -> list[str]:
    """Unknown keys, each with the closest known one where there is one."""
    out = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(known), n=1)
        out.append(f"{key} (did you mean {close[0]}?)" if close else key)
    return out
