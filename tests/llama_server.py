"""A real llama-server for the tests, and a recording proxy in front of it.

The binary comes from ``scripts/build_llama_server.sh``; ``make test`` builds it (once, cached)
and names it in ``LOCALBOT_LLAMA_SERVER``.  The server runs the embedded SmolLM2 model on
127.0.0.1 with 4 slots of 8192 tokens each, as the issue asks.

The proxy forwards everything unchanged and keeps each request's JSON body, so tests can check
the token ids the server received; it can also answer with faults (503s, an error event inside
a 200 stream, a stream cut before its terminator).
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import ClientSession, ClientTimeout, web

from ai_model.embedded import embedded_model_path
from tests.waiting import free_port

SLOTS = 4
SLOT_CTX = 8192


def binary() -> Path | None:
    """The llama-server binary: ``LOCALBOT_LLAMA_SERVER``, else the build script's cache."""
    named = os.environ.get("LOCALBOT_LLAMA_SERVER", "")
    if named:
        path = Path(named)
        if not path.is_file():
            pytest.fail(f"LOCALBOT_LLAMA_SERVER names {named}, which does not exist")
        return path
    found = sorted(glob.glob(str(Path.home() / ".cache/localbot/llama-server/*/llama-server")))
    return Path(found[-1]) if found else None


@dataclass
class LlamaServer:
    """One running llama-server process."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.partition(" ")
                values[name.removeprefix("llamacpp:")] = float(value)
        return values

    def busy_slot_total(self) -> tuple[float, float]:
        """(decode steps, slot-steps): their ratio is how many slots each decode served."""
        m = self.metrics()
        return m["n_decode_total"], m["n_decode_total"] * m["n_busy_slots_per_decode"]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


def start(
    log_dir: Path, slots: int = SLOTS, slot_ctx: int = SLOT_CTX, port: int = 0
) -> LlamaServer:
    """Start llama-server with the embedded model and wait for ``/health``."""
    path = binary()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("no llama-server binary in CI: .ci/run must build it (make test does)")
        pytest.skip("no llama-server binary: run scripts/build_llama_server.sh (make test does)")
    port = port or free_port()
    log = log_dir / f"llama-server-{port}.log"
    threads = str(max(1, min(4, os.cpu_count() or 1)))
    command = [
        str(path),
        "-m",
        str(embedded_model_path()),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-np",
        str(slots),
        "-c",
        str(slots * slot_ctx),
        "-t",
        threads,
        "--metrics",
    ]
    with log.open("ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    server = LlamaServer(process, port, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"llama-server exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    pytest.fail(f"llama-server did not become healthy: {log.read_text()[-2000:]}")


def serve(log_dir: Path) -> Iterator[LlamaServer]:
    server = start(log_dir)
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Proxy:
    """Forwards to ``upstream`` and records request bodies; faults are opt-in per test."""

    upstream: str
    requests: list[tuple[str, Any]] = field(default_factory=list)
    fail_statuses: list[int] = field(default_factory=list)  # next completions answer these
    error_event: bool = False  # next completion: a 200 stream carrying an error object
    cut_after: int | None = None  # next completion: this many events, then the end
    stalls: list[float] = field(default_factory=list)  # next completions wait this long first
    vocab_size: int | None = None  # /v1/models claims this vocabulary size
    port: int = 0
    _runner: web.AppRunner | None = None
    _session: ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def completions(self) -> list[dict[str, Any]]:
        return [b for p, b in self.requests if p in ("/completion", "/v1/completions")]

    async def start(self) -> None:
        self._session = ClientSession(timeout=ClientTimeout(total=None))
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            parsed: Any = json.loads(body) if body else None
        except ValueError:
            parsed = body
        path = request.path
        self.requests.append((path, parsed))
        completion = path in ("/completion", "/v1/completions")
        if completion and self.fail_statuses:
            status = self.fail_statuses.pop(0)
            error = {"error": {"code": status, "message": "Loading model", "type": "unavailable"}}
            return web.json_response(error, status=status)
        if completion and self.stalls:
            await asyncio.sleep(self.stalls.pop(0))  # a server that accepts, then says nothing
        if completion and self.error_event:
            self.error_event = False
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            event = {"error": {"code": 500, "message": "out of memory", "type": "server_error"}}
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
            await response.write_eof()
            return response
        assert self._session is not None
        forward = {"Content-Type": "application/json"}
        async with self._session.request(
            request.method, self.upstream + path, data=body, headers=forward
        ) as upstream:
            if path == "/v1/models" and self.vocab_size is not None:
                listing = await upstream.json()
                listing["data"][0]["meta"]["n_vocab"] = self.vocab_size
                return web.json_response(listing)
            response = web.StreamResponse(
                status=upstream.status,
                headers={"Content-Type": upstream.headers.get("Content-Type", "text/plain")},
            )
            cut, self.cut_after = (self.cut_after, None) if completion else (None, self.cut_after)
            events = 0
            try:
                await response.prepare(request)
                async for line in upstream.content:
                    await response.write(line)
                    if line.startswith(b"data:"):
                        events += 1
                        if cut is not None and events >= cut:
                            break
                await response.write_eof()
            except ConnectionError:
                pass  # the bot hung up (its reply was complete, or it gave up): as a server would
            return response
