"""Prompts: the window of turns, assembly, the history cache and memory beyond the window."""
