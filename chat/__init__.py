"""The conversation engine: the answer pipeline, commands, prompts, roleplay and memory.

It imports only ``ai_model`` and ``storage`` below it; adapters and the program import it.
"""
