"""The reading process: ``python -m chat.documents.worker '<json>'`` reads a file's bytes from
stdin and writes its pages (or the refusal) as JSON to stdout.

It limits itself before it reads anything: address space and CPU time, so that a file built
to exhaust memory or time ends this process, not the bot.
"""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import asdict

from chat.documents.limits import MIB, DocumentSettings
from chat.documents.reading import Unreadable, read

BASE_ADDRESS_SPACE = 768 * MIB  # the interpreter, pypdf, lxml and their arenas


def limit_self(limits: DocumentSettings) -> None:
    space = BASE_ADDRESS_SPACE + 8 * limits.max_bytes
    resource.setrlimit(resource.RLIMIT_AS, (space, space))
    seconds = int(limits.max_seconds) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds + 1))


def main(argv: list[str]) -> int:
    header = json.loads(argv[1])
    limits = DocumentSettings(**header["limits"])
    limit_self(limits)
    data = sys.stdin.buffer.read(limits.max_bytes + 1)
    try:
        pages = read(str(header["name"]), data, limits)
        out: dict[str, object] = asdict(pages)
    except Unreadable as exc:
        out = {"error": str(exc)}
    except MemoryError:
        out = {"error": "memory"}
    except RecursionError:
        out = {"error": "damaged"}
    sys.stdout.write(json.dumps(out, ensure_ascii=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
