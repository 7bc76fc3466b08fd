"""Documents: files posted in work conversations, read, chunked, indexed and retrieved for the
office model's prompt, with their sources.

:mod:`reading` turns a file's bytes into pages of text (inside a bounded worker process,
:mod:`worker`); :mod:`chunking` cuts pages into chunks sized in the office model's tokens;
:mod:`terms` makes what the database indexes and searches; :mod:`library` is what the engine
calls: ingest, list, forget, and the excerpts for one prompt.
"""
