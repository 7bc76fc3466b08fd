"""``python -m bot bench --backend llama-server``: the office role through a llama-server beside
the same role in-process, measured in one run, through the whole core.

Both sides answer the same questions with the same sampling (greedy, fixed seed), alternately,
so that the machine's noise falls on both alike.  Figures: first-token time and streamed
tokens/s of one conversation, then four conversations sending at the same instant (their
slowest first token and their aggregate tokens/s).  Without ``--url`` the bench starts its own
llama-server (the embedded model, 4 slots of 8192 tokens) and stops it at the end.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from ai_model.config import ModelSettings, SamplingSettings
from ai_model.embedded import embedded_model_path
from ai_model.registry import ModelRegistry
from bot.bench.common import bench_settings, log
from bot.bench.shared_server import measure_shared
from chat.core import ConversationCore
from chat.messages import IncomingMessage
from storage import Store, open_database

QUESTIONS = [
    "Explain in a few sentences how a budget meeting should be prepared.",
    "Write a short note to the team about the new invoice process.",
    "List some good habits for writing clear reports.",
    "Describe a simple plan for organising a quarterly review.",
]


def server_binary() -> str:
    named = os.environ.get("LOCALBOT_LLAMA_SERVER", "")
    found = sorted(glob.glob(str(Path.home() / ".cache/localbot/llama-server/*/llama-server")))
    binary = named or (found[-1] if found else "")
    if not binary:
        raise SystemExit("no llama-server: run scripts/build_llama_server.sh, or pass --url")
    return binary


def start_server(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:  # a free port, asked of the system
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    threads = str(os.cpu_count() or 1)
    command = [server_binary(), "-m", str(embedded_model_path()), "--host", "127.0.0.1"]
    command += ["--port", str(port), "-np", "4", "-c", str(4 * 8192), "-t", threads, "--metrics"]
    out = (folder / "llama-server.log").open("wb")
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"llama-server did not start; see {folder / 'llama-server.log'}")


class Side:
    """One deployment of the office role (in-process or remote) with its own core and store."""

    def __init__(self, name: str, model: ModelSettings, folder: Path) -> None:
        self.name = name
        self.settings = bench_settings(folder / f"{name}.db", model)
        self.count = 0

    async def open(self) -> None:
        self.registry = ModelRegistry(self.settings.models)
        await self.registry.connect()
        self.store = Store(await open_database(self.settings.database_url))
        self.core = ConversationCore(self.settings, self.store, self.registry)

    async def close(self) -> None:
        await self.store.close()
        await self.registry.aclose()

    async def ask(self, question: str, start: float | None = None) -> tuple[float, float, int]:
        """First-token time, streamed tokens/s and tokens of one fresh conversation."""
        self.count += 1
        msg = IncomingMessage("bench", f"bench:{self.count}", "u", "Ann", question, True, True)
        began = start if start is not None else time.perf_counter()
        first = last = 0.0
        text = ""
        async for reply in self.core.answers.respond(msg):
            now = time.perf_counter()
            if reply.delta and not first:
                first = now
            last = now
            text = reply.text
        model = await self.registry.get("office")
        tokens = await asyncio.to_thread(model.tokenize, text.encode(), False, False)
        rate = (len(tokens) - 1) / (last - first) if last > first else 0.0
        return first - began, rate, len(tokens)

    async def concurrent(self, n: int) -> tuple[float, float]:
        """``n`` conversations at the same instant: slowest first token, aggregate tokens/s."""
        began = time.perf_counter()
        results = await asyncio.gather(
            *(self.ask(QUESTIONS[i % len(QUESTIONS)], began) for i in range(n))
        )
        elapsed = time.perf_counter() - began
        return max(r[0] for r in results), sum(r[2] for r in results) / elapsed


async def measure(url: str, folder: Path, rounds: int) -> dict[str, Any]:
    sampling = SamplingSettings(max_tokens=96, temperature=0.0, seed=5)
    local = Side("local", ModelSettings(sampling=sampling, state_dir=""), folder)
    remote = Side(
        "server", ModelSettings(backend="llama-server", url=url, sampling=sampling), folder
    )
    sides = (local, remote)
    for side in sides:
        await side.open()
        await side.ask("Hello!")  # loads the model, warms caches
    single: dict[str, list[tuple[float, float, int]]] = {s.name: [] for s in sides}
    four: dict[str, list[tuple[float, float]]] = {s.name: [] for s in sides}
    for i in range(rounds):
        for side in sides if i % 2 == 0 else sides[::-1]:
            single[side.name].append(await side.ask(QUESTIONS[i % len(QUESTIONS)]))
            four[side.name].append(await side.concurrent(4))
        log(f"round {i + 1}/{rounds} done")
    for side in sides:
        await side.close()
    out: dict[str, Any] = {"rounds": rounds, "server_url": url}
    for name in single:
        out[f"{name}_ttft_s"] = round(statistics.median(r[0] for r in single[name]), 4)
        out[f"{name}_tokens_per_s"] = round(statistics.median(r[1] for r in single[name]), 1)
        out[f"{name}_concurrent4_worst_ttft_s"] = round(
            statistics.median(r[0] for r in four[name]), 4
        )
        out[f"{name}_concurrent4_tokens_per_s"] = round(
            statistics.median(r[1] for r in four[name]), 1
        )
    out["server_over_local_ttft"] = round(out["server_ttft_s"] / out["local_ttft_s"], 3)
    out["server_over_local_tokens_per_s"] = round(
        out["server_tokens_per_s"] / out["local_tokens_per_s"], 3
    )
    out["server_concurrent4_over_single_tokens_per_s"] = round(
        out["server_concurrent4_tokens_per_s"] / out["server_tokens_per_s"], 3
    )
    out["local_concurrent4_over_single_tokens_per_s"] = round(
        out["local_concurrent4_tokens_per_s"] / out["local_tokens_per_s"], 3
    )
    return out


def main(url: str = "", quick: bool = False, shared: bool = False) -> int:
    with tempfile.TemporaryDirectory(prefix="localbot-bench-remote-") as name:
        folder = Path(name)
        process = None
        if not url:
            process, url = start_server(folder)
        try:
            if shared:
                results = asyncio.run(measure_shared(url, 2 if quick else 4))
            else:
                results = asyncio.run(measure(url, folder, 2 if quick else 6))
        finally:
            if process is not None:
                process.terminate()
                process.wait(20)
    print(json.dumps(results, sort_keys=True))
    return 0
