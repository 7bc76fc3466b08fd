"""Secrets stay out of what the bot prints and logs: tokens, API keys, database passwords."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from chat.settings import Settings

MASK = "***"


def shown_url(url: str) -> str:
    """A database URL with its password masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return url.split("@")[-1] if "@" in url else url


def secrets_of(settings: Settings) -> list[str]:
    """Every secret the settings hold: platform tokens, engines' API keys, the database's
    password (each as it would appear in a URL or a header)."""
    found = [p.token for p in settings.platforms.values() if p.token]
    found += [p.webhook_secret for p in settings.platforms.values() if p.webhook_secret]
    found += [m.api_key for m in settings.models.values() if m.api_key]
    try:
        password = make_url(settings.database_url).password
    except (ArgumentError, ValueError):
        password = None
    if password:
        found.append(str(password))
    return sorted({s for s in found if len(s) >= 4}, key=len, reverse=True)


class Redacting(logging.Filter):
    """Masks the secrets in every record a handler writes (an HTTP client's debug line
    carries Telegram's token in the URL)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        text = record.getMessage()
        if any(s in text for s in self.secrets):
            for secret in self.secrets:
                text = text.replace(secret, MASK)
            record.msg, record.args = text, None
        return True


def redact_logs(settings: Settings) -> None:
    """Install :class:`Redacting` on every handler of the root logger."""
    redacting = Redacting(secrets_of(settings))
    for handler in logging.getLogger().handlers:
        handler.addFilter(redacting)
