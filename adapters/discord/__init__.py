"""The Discord adapter: discord.py's client, intake, delivery and the slash commands."""

from adapters.discord.adapter import DiscordAdapter, DiscordOptions, conversation_key

__all__ = ["DiscordAdapter", "DiscordOptions", "conversation_key"]
