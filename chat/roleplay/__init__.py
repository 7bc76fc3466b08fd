"""Roleplay: characters and their cards, lorebooks, scene rules, the shared library."""
