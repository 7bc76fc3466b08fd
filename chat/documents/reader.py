"""Reading a file off the event loop, in a process of its own with a deadline.

The bot's process only holds the file's bytes (whose size was checked before the download)
and the text that comes back; the parsing and whatever a hostile file makes it allocate
happen in :mod:`chat.documents.worker`, which is killed at ``max_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from dataclasses import asdict

from chat.documents.limits import DocumentSettings
from chat.documents.reading import Pages

log = logging.getLogger(__name__)

READERS = 2  # files read at once, whoever posted them


class Reader:
    """Reads files in bounded worker processes, a few at a time."""

    def __init__(self, limits: DocumentSettings, readers: int = READERS) -> None:
        self.limits = limits
        self._slots = asyncio.Semaphore(readers)

    async def read(self, name: str, data: bytes) -> Pages | str:
        """The file's pages, or the one line that says why it cannot be read."""
        limits = self.limits
        header = json.dumps({"name": name, "limits": asdict(limits)})
        async with self._slots:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "chat.documents.worker",
                header,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                out, err = await asyncio.wait_for(proc.communicate(data), limits.max_seconds)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                return f"Reading {name} took longer than {limits.max_seconds:g} s, so I stopped."
            except asyncio.CancelledError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                raise
        try:
            found = json.loads(out) if out else None
        except ValueError:
            found = None
        if proc.returncode != 0 or not isinstance(found, dict):
            # Killed by its own limits (memory, CPU), or crashed inside a parser.
            log.warning(
                "documents: reading %r ended with %s: %s",
                name,
                proc.returncode,
                err.decode("utf-8", "replace")[-300:],
            )
            return f"{name} needed more memory or time than I allow for one file, so I stopped."
        error = found.get("error")
        if error == "memory":
            return f"{name} needed more memory than I allow for one file, so I stopped."
        if error == "damaged":
            return f"{name} looks damaged: I could not read it."
        if isinstance(error, str):
            return error
        return Pages(str(found["kind"]), [str(p) for p in found["pages"]], bool(found["paged"]))
