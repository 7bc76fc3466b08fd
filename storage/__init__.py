"""Persistence: schema, ordered migrations and every query the bot makes."""

from storage.database import create_engine, open_database
from storage.records import Conversation, StoredMessage
from storage.store import Store

__all__ = ["Conversation", "Store", "StoredMessage", "create_engine", "open_database"]
