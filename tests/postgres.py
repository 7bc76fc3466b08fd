"""A throwaway PostgreSQL server for the tests, started from Debian's binaries.

``initdb`` refuses to run as root, so under root the server runs as the ``postgres`` user.  It
listens on 127.0.0.1 only, with fsync off (the data dies with the test run); each test gets a
database of its own.  ``LOCALBOT_PG_BIN`` names the binaries' folder (``make test`` sets it from
``scripts/ensure_postgres.sh``, which installs them when missing).
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.waiting import free_port

USER = "localbot"


def find_binaries() -> Path | None:
    for folder in [os.environ.get("LOCALBOT_PG_BIN", ""), *glob.glob("/usr/lib/postgresql/*/bin")]:
        if folder and all((Path(folder) / tool).is_file() for tool in ("initdb", "pg_ctl")):
            return Path(folder)
    return None


@dataclass
class PostgresServer:
    port: int
    _names: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://{USER}@127.0.0.1:{self.port}/{database}"

    async def new_database(self) -> str:
        """Create an empty database; return its SQLAlchemy URL."""
        import asyncpg

        name = f"test_{os.getpid()}_{next(self._names)}"
        conn = await asyncpg.connect(
            host="127.0.0.1", port=self.port, user=USER, database="postgres"
        )
        try:
            await conn.execute(f"CREATE DATABASE {name}")
        finally:
            await conn.close()
        return self.url(name)


def start_server() -> Iterator[PostgresServer]:
    """Run a server for the duration of the generator (a session fixture's body)."""
    binaries = find_binaries()
    if binaries is None:
        raise RuntimeError(
            "PostgreSQL binaries not found: run scripts/ensure_postgres.sh (make test does)"
        )
    root = Path(tempfile.mkdtemp(prefix="localbot-pg-"))
    data = root / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def run(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, capture_output=True, cwd=root)

    run(
        str(binaries / "initdb"),
        "-D",
        str(data),
        "-A",
        "trust",
        "-U",
        USER,
        "-E",
        "UTF8",
        "--no-sync",
    )
    options = f"-h 127.0.0.1 -p {port} -k {root} -F -c max_connections=200"
    run(
        str(binaries / "pg_ctl"),
        "-D",
        str(data),
        "-o",
        options,
        "-l",
        str(root / "log"),
        "-w",
        "start",
    )
    try:
        yield PostgresServer(port)
    finally:
        subprocess.run(
            [*as_user, str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            cwd=root,
        )
        shutil.rmtree(root, ignore_errors=True)
