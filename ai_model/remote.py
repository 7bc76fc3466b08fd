"""A model served by an inference engine over HTTP: llama-server or an OpenAI-compatible one.

The prompt is built here, token-exact, as for the in-process model, and sent as token ids (BOS
included), so the server never parses user text for special tokens.  What differs between the
engines (endpoints, request fields, stream events) is a :class:`Dialect`, one per module:
``ai_model/llama_server.py`` and ``ai_model/openai_api.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from ai_model.base import GenerationError, ModelError
from ai_model.config import ModelSettings, SamplingSettings
from ai_model.jinja_format import choose_template
from ai_model.sampling import Grammar
from ai_model.server_vocab import ServerTokenizer
from ai_model.templates import ChatTemplate, UnknownTemplateError
from ai_model.vocab import VocabModel

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
RETRY_STATUSES = frozenset({429, 502, 503, 504})
MAX_REMEMBERED_REPLIES = 4096
# Text whose tokens must be the same on both ends when the GGUF file is also here.
VOCAB_PROBE = "Héllo wörld: 12,345 tokens — <|im_start|> «ünïcode» 🙂\n\tdone."


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What a server said about itself at start-up (``None``: it did not say)."""

    n_ctx: int | None  # per slot (llama-server) or per sequence (vLLM)
    n_vocab: int | None
    slots: int | None  # llama-server slots
    chat_template: str | None
    bos_token: str = ""  # the texts of the special tokens, for the model's own template
    eos_token: str = ""


@dataclass(frozen=True, slots=True)
class Event:
    """One stream event: new text, the token ids behind it when the server says, the end."""

    text: str
    tokens: tuple[int, ...] = ()
    done: bool = False


class Retryable(Exception):
    """A failure before anything was generated that another attempt may not meet."""


class Dialect(Protocol):
    """How one engine is spoken to."""

    kind: str

    def probe(self, http: httpx.Client, url: str, settings: ModelSettings) -> ServerInfo:
        """Health check and self-description (blocking); raise ModelError naming the URL."""
        ...

    def request(
        self,
        prompt: list[int],
        sampling: SamplingSettings,
        stops: list[str],
        slot: int | None,
        settings: ModelSettings,
        grammar: Grammar | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """The path and JSON body of a streaming completion; ``grammar`` where the engine can
        hold one (llama-server; others leave it to the caller's validation)."""
        ...

    def event(self, data: Any) -> Event:
        """One parsed stream payload (``"[DONE]"`` or a JSON object) as an event."""
        ...


def int_or_none(value: Any) -> int | None:
    """An integer from a server's JSON, or ``None`` for anything else (booleans included)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def headers(settings: ModelSettings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}


def error_text(data: Any) -> str:
    """The message inside an engine's ``{"error": ...}`` object, bounded."""
    error = data.get("error") if isinstance(data, dict) else data
    if isinstance(error, dict):
        error = error.get("message") or error.get("type") or error
    return str(error)[:300]


class SlotMap:
    """Keeps each conversation on one of ``slots`` (server slot numbers this process owns), so
    the server reuses its prefix there.

    A conversation whose slot is busy with another one moves to the least recently used idle
    slot (its old cache there is being overwritten anyway); with none idle it waits for its own.
    """

    def __init__(self, slots: Sequence[int]) -> None:
        self.slots = list(slots)
        self._owner: OrderedDict[str | None, int] = OrderedDict()
        self._busy = dict.fromkeys(self.slots, 0)
        self._used = dict.fromkeys(self.slots, 0)
        self._clock = 0

    def acquire(self, conversation: str | None) -> int | None:
        if not self.slots:
            return None
        slot = self._owner.get(conversation)
        if slot is None or self._busy[slot]:
            idle = [s for s in self.slots if not self._busy[s]]
            if idle:
                slot = min(idle, key=lambda s: self._used[s])
            elif slot is None:
                slot = min(self.slots, key=lambda s: self._busy[s])
        self._clock += 1
        self._used[slot] = self._clock
        self._busy[slot] += 1
        self._owner[conversation] = slot
        self._owner.move_to_end(conversation)
        while len(self._owner) > MAX_REMEMBERED_REPLIES:
            self._owner.popitem(last=False)
        return slot

    def release(self, slot: int | None) -> None:
        if slot is not None:
            self._busy[slot] -= 1


class RemoteModel:
    """A role served by an engine.  Implements :class:`ai_model.base.ChatModel`."""

    def __init__(
        self,
        settings: ModelSettings,
        dialect: Dialect,
        info: ServerInfo,
        tokenizer: VocabModel | ServerTokenizer,
        template: ChatTemplate,
        name: str,
        http: httpx.Client,
    ) -> None:
        self.settings = settings
        self.dialect = dialect
        self.info = info
        self.name = name
        self.template = template
        self.url = settings.url.rstrip("/")
        self.n_ctx: int = min(settings.n_ctx, info.n_ctx or settings.n_ctx)
        self._tokenizer = tokenizer
        self._http = http  # blocking, for /tokenize; streams use an AsyncClient per event loop
        self.bos: tuple[int, ...] = tuple(tokenizer.tokenize(b"", add_bos=True, special=True))
        # No slots named: the server picks one per request (id_slot -1), by prompt similarity.
        self.slots = SlotMap(settings.server_slots) if settings.server_slots else None
        self._controls = tokenizer.control_ids()  # what no reply may hold
        self._generated: OrderedDict[str | None, tuple[int, ...]] = OrderedDict()
        # The stream client and the in-flight gate belong to the event loop that made them.
        self._session: (
            tuple[asyncio.AbstractEventLoop, httpx.AsyncClient, asyncio.Semaphore] | None
        ) = None

    @classmethod
    def load(
        cls, settings: ModelSettings, path: Path | None, name: str, dialect: Dialect
    ) -> RemoteModel:
        """Reach the server, check it serves what the settings say (blocking)."""
        url = settings.url.rstrip("/")
        http = httpx.Client(
            timeout=httpx.Timeout(settings.request_timeout_s, connect=CONNECT_TIMEOUT_S)
        )
        tokenizer: VocabModel | ServerTokenizer | None = None
        try:
            info = dialect.probe(http, url, settings)
            if path is not None:
                tokenizer = VocabModel.load(settings, path, name)
                template = tokenizer.template
                _check_vocab(tokenizer, http, url, settings, info)
            else:
                tokenizer = ServerTokenizer(http, url, headers(settings))
                try:
                    template = choose_template(
                        settings.chat_template,
                        info.chat_template,
                        tokenizer,
                        bos=info.bos_token,
                        eos=info.eos_token,
                        adds_bos=tuple(tokenizer.tokenize(b"", add_bos=True, special=True)),
                    )
                except UnknownTemplateError as exc:
                    raise ModelError(f"{dialect.kind} at {url}: {exc}") from exc
                tokenizer.check_plain_text(template)
            if info.slots is not None and any(s >= info.slots for s in settings.server_slots):
                raise ModelError(
                    f"{dialect.kind} at {url} has {info.slots} slots, but server_slots names "
                    f"{max(settings.server_slots)}: slots count from 0"
                )
            if info.n_ctx is not None and info.n_ctx < settings.n_ctx:
                raise ModelError(
                    f"{dialect.kind} at {url} gives each conversation {info.n_ctx} tokens of "
                    f"context, but n_ctx is {settings.n_ctx}: start the server with a context "
                    f"of (slots x {settings.n_ctx}), or lower n_ctx to {info.n_ctx}"
                )
        except BaseException as exc:
            http.close()
            if isinstance(tokenizer, VocabModel):
                tokenizer.close()
            if isinstance(exc, GenerationError):
                raise ModelError(f"{dialect.kind} at {url}: {exc}") from exc
            raise
        return cls(settings, dialect, info, tokenizer, template, name, http)

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        return self._tokenizer.tokenize(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._tokenizer.detokenize(tokens)

    def generated(self, slot: str | None) -> Sequence[int]:
        return self._generated.get(slot, ())

    def upcoming(self, slot: str | None) -> None:
        """The server batches what it receives by itself."""

    def _client(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session[0] is not loop:
            timeout = httpx.Timeout(self.settings.request_timeout_s, connect=CONNECT_TIMEOUT_S)
            limits = httpx.Limits(max_connections=self.settings.parallel + 2)
            client = httpx.AsyncClient(timeout=timeout, limits=limits)
            self._session = (loop, client, asyncio.Semaphore(self.settings.parallel))
        return self._session[1], self._session[2]

    async def stream(
        self,
        tokens: Sequence[int],
        sampling: SamplingSettings,
        stop: Sequence[str] = (),
        slot: str | None = None,
        background: bool = False,
        grammar: Grammar | None = None,
    ) -> AsyncIterator[str]:
        """Yield reply text pieces; failures before the first piece are retried."""
        client, gate = self._client()
        prompt = list(tokens)
        stops = self.template.stops_with(sampling.stop, stop)
        async with gate:
            slot_id = self.slots.acquire(slot) if self.slots is not None else None
            try:
                produced: list[int] = []
                started = False
                for attempt in range(self.settings.retries + 1):
                    produced.clear()
                    try:
                        events = self._events(client, prompt, sampling, stops, slot_id, grammar)
                        try:
                            async for event in events:
                                if self._controls.intersection(event.tokens):
                                    # A control token no reply may hold (a turn header the
                                    # model wrote itself): the reply ends here, without it.
                                    break
                                produced.extend(event.tokens)
                                if event.text:
                                    started = True
                                    yield event.text
                        finally:
                            await events.aclose()
                        break
                    except Retryable as exc:
                        if started:
                            raise GenerationError(
                                f"{self.dialect.kind} at {self.url} failed mid-reply: {exc}"
                            ) from exc
                        if attempt == self.settings.retries:
                            raise GenerationError(
                                f"{self.dialect.kind} at {self.url} failed "
                                f"{attempt + 1} time(s): {exc}"
                            ) from exc
                        log.warning("%s at %s: %s; retrying", self.dialect.kind, self.url, exc)
                        await asyncio.sleep(min(0.5 * 2**attempt, 4.0))
                self._generated[slot] = tuple(produced)
                self._generated.move_to_end(slot)
                while len(self._generated) > MAX_REMEMBERED_REPLIES:
                    self._generated.popitem(last=False)
            finally:
                if self.slots is not None:
                    self.slots.release(slot_id)

    async def _events(
        self,
        client: httpx.AsyncClient,
        prompt: list[int],
        sampling: SamplingSettings,
        stops: list[str],
        slot: int | None,
        grammar: Grammar | None,
    ) -> AsyncGenerator[Event, None]:
        path, body = self.dialect.request(prompt, sampling, stops, slot, self.settings, grammar)
        try:
            async with client.stream(
                "POST", self.url + path, json=body, headers=headers(self.settings)
            ) as response:
                if response.status_code != 200:
                    text = (await response.aread())[:2000].decode("utf-8", "replace")
                    try:
                        reason = error_text(json.loads(text))
                    except ValueError:
                        reason = text[:300]
                    message = f"HTTP {response.status_code}: {reason}"
                    if response.status_code in RETRY_STATUSES:
                        raise Retryable(message)
                    raise GenerationError(f"{self.dialect.kind} at {self.url}: {message}")
                async for line in response.aiter_lines():
                    event = self._parse(line)
                    if event is None:
                        continue
                    yield event
                    if event.done:
                        return
        except httpx.TimeoutException as exc:
            raise Retryable(f"no answer within {self.settings.request_timeout_s:g}s") from exc
        except httpx.TransportError as exc:
            raise Retryable(f"{type(exc).__name__}: {exc or 'connection lost'}") from exc
        raise Retryable("the stream ended without its terminator")

    def _parse(self, line: str) -> Event | None:
        """One SSE line as an event; ``None`` for blank lines, comments and other fields."""
        field, _, value = line.partition(":")
        if field not in ("data", "error"):
            return None
        value = value.strip()
        if value == "[DONE]":
            return self.dialect.event(value)
        try:
            data = json.loads(value)
        except ValueError as exc:
            raise GenerationError(f"{self.dialect.kind} sent a malformed event: {exc}") from exc
        if field == "error" or (isinstance(data, dict) and "error" in data):
            raise GenerationError(f"{self.dialect.kind} at {self.url}: {error_text(data)}")
        return self.dialect.event(data)

    async def aclose(self) -> None:
        if self._session is not None:
            loop, client, _ = self._session
            if loop is asyncio.get_running_loop():
                await client.aclose()
            self._session = None

    def close(self) -> None:
        self._http.close()
        if isinstance(self._tokenizer, VocabModel):
            self._tokenizer.close()


def _check_vocab(
    vocab: VocabModel,
    http: httpx.Client,
    url: str,
    settings: ModelSettings,
    info: ServerInfo,
) -> None:
    """The local GGUF file and the served model must tokenize alike."""
    local_n = vocab.n_vocab
    if info.n_vocab is not None and info.n_vocab != local_n:
        raise ModelError(
            f"the server at {url} runs a model with {info.n_vocab} tokens in its vocabulary, but "
            f"{settings.path} has {local_n}: both ends must use the same GGUF file"
        )
    served = _server_tokens(http, url, settings, VOCAB_PROBE)
    if served is None:
        log.warning("%s: cannot compare vocabularies (no /tokenize); trusting the settings", url)
        return
    mine = vocab.tokenize(VOCAB_PROBE.encode("utf-8"), add_bos=False, special=False)
    if served != mine:
        raise ModelError(
            f"the server at {url} tokenizes text differently from {settings.path}: both ends "
            "must use the same GGUF file"
        )


def _server_tokens(
    http: httpx.Client, url: str, settings: ModelSettings, text: str
) -> list[int] | None:
    """``text`` tokenized by the server as plain text, in llama-server's or vLLM's form."""
    bodies: list[dict[str, Any]] = [
        {"content": text, "add_special": False, "parse_special": False},
        {"model": settings.model, "prompt": text, "add_special_tokens": False},
    ]
    for body in bodies:
        try:
            response = http.post(f"{url}/tokenize", json=body, headers=headers(settings))
            tokens = response.json().get("tokens") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            tokens = None
        if isinstance(tokens, list) and all(isinstance(t, int) for t in tokens):
            return tokens
    return None


def ask_json(http: httpx.Client, kind: str, url: str, path: str, settings: ModelSettings) -> Any:
    """GET ``path`` as JSON, or a ModelError that names the URL and what failed."""
    try:
        response = http.get(url + path, headers=headers(settings))
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        raise ModelError(
            f"cannot reach {kind} at {url}{path}: {reason}. Start the server, or fix the role's "
            "url in the settings."
        ) from exc
    if response.status_code != 200:
        try:
            reason = error_text(response.json())
        except ValueError:
            reason = response.text[:200]
        raise ModelError(f"{kind} at {url}{path} answered HTTP {response.status_code}: {reason}")
    try:
        return response.json()
    except ValueError as exc:
        raise ModelError(f"{kind} at {url}{path} did not answer JSON: {exc}") from exc
