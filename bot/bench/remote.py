"""``python -m bot bench --backend llama-server``: the office role through a llama-server beside
the same role in-process, measured in one run, through the whole core.

Both sides get the same sampling (greedy, fixed seed), reply budget and flash-attention setting
(the server is started with ``-fa`` set as the in-process side has it: llama-server's own
default, ``auto``, turns it on for a CPU, where it is faster over short contexts and twice as
slow over long ones), alternately, so that the machine's noise falls on both alike.  Within a
side every conversation asks a question no other one asks; each round gives both sides the
same questions, so that greedy decoding writes replies of the same lengths on both (the
tokens each side wrote are reported beside its figures).
Figures, for 1, 4 and 8 conversations sending at the same instant: the median and the worst
first token and the aggregate tokens/s, on each side and as in-process over server; and one
conversation's streamed tokens/s.  Without ``--url`` the bench starts its own llama-server (the
embedded model, 8 slots of 8192 tokens) and stops it at the end.
"""

from __future__ import annotations

import asyncio
import glob
import itertools
import json
import os
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from ai_model.config import ModelSettings, SamplingSettings
from ai_model.embedded import embedded_model_path
from ai_model.registry import ModelRegistry
from bot.bench.common import bench_settings, log
from bot.bench.shared_server import measure_shared, prompt_tokens_evaluated
from chat.core import ConversationCore
from chat.messages import IncomingMessage
from storage import Store, open_database

# Every conversation of a run asks its own question, from its first token: neither side can
# reuse another conversation's user text.  llama-server gives a request the slot whose cached
# prompt shares the longest beginning with it; a question that began with a number shared its
# first digits (tokens of their own) with one of the eight cached questions most of the time, so
# the server evaluated one or two tokens fewer a question than the in-process side, which never
# shares a message's text.  Questions now begin with a word whose first token no question
# among the ``len(openers)`` before it began with.
_WORDS = """
Apple Arrow Anchor Autumn Bamboo Banner Beacon Bridge Candle Canyon Castle Cedar Comet Copper
Coral Crystal Delta Desert Dragon Eagle Echo Ember Falcon Feather Forest Fountain Galaxy Garden
Glacier Granite Harbor Hazel Horizon Island Ivory Jasmine Jungle Kettle Lantern Lemon Lotus
Magnet Maple Marble Meadow Mirror Nebula Needle Ocean Olive Orchid Panther Pebble Pepper Planet
Quartz Quill Rabbit Raven Ribbon River Rocket Saddle Salmon Shadow Silver Spruce Summit Thunder
Tiger Timber Tulip Umbrella Valley Velvet Violet Walnut Willow Window Winter Yellow Zebra
Zenith Acorn Badger Cactus Dolphin Gazelle Heron Iris Juniper Koala Lilac Mango Nectar Otter
Parrot Quince Robin Sparrow Thistle Urchin Viper Wombat Yarrow Amber Basil Clover Daisy Elm Fig
Ginger Holly Indigo Jade Kelp Laurel Moss Nutmeg Onyx Pine Rose Sage Teal Vine Wheat"""
OPENERS = _WORDS.split()
SUBJECTS = [
    "Budget",
    "Invoice",
    "Hiring",
    "Security",
    "Travel",
    "Onboarding",
    "Marketing",
    "Payroll",
    "Vendor",
    "Backup",
    "Training",
    "Compliance",
    "Inventory",
    "Pricing",
    "Support",
    "Logistics",
]
ASKS = [
    "explain in a few sentences how the team should prepare for the review",
    "write a short note to the staff about the new process",
    "list some good habits that keep the work clear and on time",
    "describe a simple plan for the next quarter",
]
CONCURRENCY = (1, 4, 8)
MIN_OPENERS = 32  # more than the questions a run asks between two uses of one server slot


def openers(first_token: Callable[[str], int]) -> list[str]:
    """The words of :data:`OPENERS` whose first token (``first_token``) no earlier one has."""
    seen: set[int] = set()
    kept = []
    for word in OPENERS:
        if (token := first_token(word)) not in seen:
            seen.add(token)
            kept.append(word)
    if len(kept) < MIN_OPENERS:
        raise SystemExit(f"the tokenizer leaves {len(kept)} distinct openers (< {MIN_OPENERS})")
    return kept


def questions(words: Sequence[str]) -> Iterator[str]:
    """Distinct questions, each beginning with a token that none of the ``len(words)`` before it
    began with (see :data:`OPENERS`)."""
    for n in itertools.count(1):
        subject = SUBJECTS[n % len(SUBJECTS)]
        ask = ASKS[(n // len(SUBJECTS)) % len(ASKS)]
        yield f"{words[n % len(words)]}: {subject} matter {n * 7919 % 100_003}. {ask}."


def server_binary() -> str:
    named = os.environ.get("LOCALBOT_LLAMA_SERVER", "")
    found = sorted(glob.glob(str(Path.home() / ".cache/localbot/llama-server/*/llama-server")))
    binary = named or (found[-1] if found else "")
    if not binary:
        raise SystemExit("no llama-server: run scripts/build_llama_server.sh, or pass --url")
    return binary


def start_server(
    folder: Path, slots: int, flash_attn: bool = False
) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:  # a free port, asked of the system
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    threads = str(os.cpu_count() or 1)
    command = [server_binary(), "-m", str(embedded_model_path()), "--host", "127.0.0.1"]
    command += ["--port", str(port), "-np", str(slots), "-c", str(slots * 8192), "-t", threads]
    command += ["-fa", "on" if flash_attn else "off", "--metrics"]
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
        self.overhead: dict[int, list[float]] = {}  # streams -> outside share, per run

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

    async def concurrent(self, asked: list[str]) -> list[tuple[float, float, int]]:
        """Conversations sending ``asked`` at the same instant: each one's first token, and
        the time the last one finished in the last tuple's rate field."""
        steps = getattr(
            getattr(await self.registry.get("office"), "scheduler", None), "steps", None
        )
        if steps is not None:
            steps.clear()  # the in-process scheduler's record of this run alone
        began = time.perf_counter()
        results = await asyncio.gather(*(self.ask(q, began) for q in asked))
        elapsed = time.perf_counter() - began
        if steps is not None:
            self.overhead.setdefault(len(asked), []).append(outside_share(list(steps), len(asked)))
        return [*results[:-1], (results[-1][0], elapsed, results[-1][2])]


def outside_share(steps: list[Any], streams: int) -> float:
    """The share of the scheduler's steps with all ``streams`` generating that went to
    anything but ``llama_decode`` and sampling: packing the batch, detokenizing, stop checks,
    handing pieces to the event loop."""
    full = [s for s in steps if len(s.decoded) == streams and not s.prefill and s.total > 0]
    total = sum(s.total for s in full)
    return sum(s.total - s.seconds - s.sampling for s in full) / total if total else 0.0


def _figures(name: str, n: int, runs: list[list[tuple[float, float, int]]]) -> dict[str, float]:
    """Median over rounds of: the median and the worst first token, and the aggregate tokens/s
    (every conversation's tokens over the time until the last one finished)."""
    median_ttft = statistics.median(statistics.median(r[0] for r in run) for run in runs)
    worst = statistics.median(max(r[0] for r in run) for run in runs)
    rate = statistics.median(sum(r[2] for r in run) / run[-1][1] for run in runs)
    return {
        f"{name}_x{n}_ttft_median_s": round(median_ttft, 4),
        f"{name}_x{n}_ttft_worst_s": round(worst, 4),
        f"{name}_x{n}_tokens_per_s": round(rate, 1),
    }


async def measure(
    url: str, folder: Path, rounds: int, max_tokens: int = 96, flash_attn: bool = False
) -> dict[str, Any]:
    """The peer table: 1, 4 and 8 conversations at once on each side, alternating sides."""
    # Greedy, without the repeat penalty: llama-server feeds the prompt to the penalty's
    # window and the in-process path does not, so with one the two sides would write other
    # replies, of other lengths, from the same prompt.
    sampling = SamplingSettings(max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0, seed=5)
    parallel = max(CONCURRENCY)
    local = Side(
        "local",
        ModelSettings(sampling=sampling, state_dir="", parallel=parallel, flash_attn=flash_attn),
        folder,
    )
    remote = Side(
        "server", ModelSettings(backend="llama-server", url=url, sampling=sampling), folder
    )
    sides = (local, remote)
    for side in sides:
        await side.open()
    office = await local.registry.get("office")
    asked = questions(openers(lambda word: office.tokenize(word.encode(), False, False)[0]))
    warm_up = next(asked)
    for side in sides:
        await side.ask(warm_up)  # loads the model, warms caches
    # Prompt tokens each side evaluated (not found cached): equal when neither reused more.

    def computed() -> float:
        return sum(u.prompt_computed for u in local.registry.usage().values())

    evaluated = {"local": -computed()}
    evaluated["server"] = -await asyncio.to_thread(prompt_tokens_evaluated, url)
    runs: dict[tuple[str, int], list[list[tuple[float, float, int]]]] = {}
    streamed: dict[str, list[float]] = {s.name: [] for s in sides}
    written: dict[str, int] = {s.name: 0 for s in sides}
    for i in range(rounds):
        alone = next(asked)
        together = {n: [next(asked) for _ in range(n)] for n in CONCURRENCY}
        for side in sides if i % 2 == 0 else sides[::-1]:
            _first, rate, n_tokens = await side.ask(alone)
            streamed[side.name].append(rate)
            written[side.name] += n_tokens
            for n in CONCURRENCY:
                run = await side.concurrent(together[n])
                runs.setdefault((side.name, n), []).append(run)
                written[side.name] += sum(r[2] for r in run)
        log(f"round {i + 1}/{rounds} done")
    evaluated["local"] += computed()
    evaluated["server"] += await asyncio.to_thread(prompt_tokens_evaluated, url)
    for side in sides:
        await side.close()
    out: dict[str, Any] = {
        "rounds": rounds,
        "server_url": url,
        "max_tokens": sampling.max_tokens,
        "flash_attn": flash_attn,
    }
    for name, count in written.items():
        out[f"{name}_tokens_written"] = count
        out[f"{name}_prompt_tokens_evaluated"] = int(evaluated[name])
    for (name, n), found in runs.items():
        out.update(_figures(name, n, found))
    for n, shares in local.overhead.items():
        out[f"local_x{n}_step_outside_decode_share"] = round(statistics.median(shares), 4)
    for name, rates in streamed.items():
        out[f"{name}_streamed_tokens_per_s"] = round(statistics.median(rates), 1)
    out["local_over_server_streamed_tokens_per_s"] = round(
        out["local_streamed_tokens_per_s"] / out["server_streamed_tokens_per_s"], 3
    )
    for n in CONCURRENCY:
        for figure in ("ttft_median_s", "ttft_worst_s", "tokens_per_s"):
            ours, theirs = out[f"local_x{n}_{figure}"], out[f"server_x{n}_{figure}"]
            out[f"local_over_server_x{n}_{figure}"] = round(ours / theirs, 3) if theirs else None
    for name in ("local", "server"):
        out[f"{name}_x4_over_x1_tokens_per_s"] = round(
            out[f"{name}_x4_tokens_per_s"] / out[f"{name}_x1_tokens_per_s"], 3
        )
    return out


def main(url: str = "", quick: bool = False, shared: bool = False, flash_attn: bool = False) -> int:
    with tempfile.TemporaryDirectory(prefix="localbot-bench-remote-") as name:
        folder = Path(name)
        process = None
        if not url:
            # The peer table needs a slot per conversation; the shared-server modes use four.
            slots = 4 if shared else max(CONCURRENCY)
            process, url = start_server(folder, slots, flash_attn)
        try:
            if shared:
                results = asyncio.run(measure_shared(url, 2 if quick else 4))
            else:
                rounds, budget = (1, 16) if quick else (6, 96)
                results = asyncio.run(measure(url, folder, rounds, budget, flash_attn))
        finally:
            if process is not None:
                process.terminate()
                process.wait(20)
    print(json.dumps(results, sort_keys=True))
    return 0
