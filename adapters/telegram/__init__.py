"""The Telegram adapter: python-telegram-bot fed by its own polling, intake, delivery, commands."""

from adapters.telegram.adapter import TelegramAdapter, conversation_key

__all__ = ["TelegramAdapter", "conversation_key"]
