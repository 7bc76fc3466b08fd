"""Tokenizing through an inference server's ``/tokenize`` when the GGUF file is not here.

Only llama-server's form of ``/tokenize`` can say "no special tokens" (``parse_special``), which
the control-token rule needs; :meth:`ServerTokenizer.check_plain_text` proves at start-up that
the server honours it before any user text is sent.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import httpx

from ai_model.base import GenerationError, ModelError
from ai_model.templates import ChatTemplate, plain_text_leaks, template_markers

MAX_CACHED = 8192  # pieces; template markup and system text repeat, user text rarely does
MAX_CACHED_CHARS = 4096  # longer pieces are not worth remembering


class ServerTokenizer:
    """``tokenize``/``detokenize`` of :class:`ai_model.base.ChatModel` over HTTP, cached per piece.

    Blocking: the core calls it off the event loop.  One request at a time, since the pooled
    connection is shared by the core's worker threads.
    """

    def __init__(self, http: httpx.Client, url: str, headers: dict[str, str]) -> None:
        self._http = http
        self._url = url.rstrip("/")
        self._headers = headers
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[bytes, bool, bool], tuple[int, ...]] = OrderedDict()
        self._controls: frozenset[int] = frozenset()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            with self._lock:
                response = self._http.post(self._url + path, json=body, headers=self._headers)
            response.raise_for_status()
            data = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise GenerationError(f"the server at {self._url} could not {path[1:]}: {exc}") from exc
        if not isinstance(data, dict):
            raise GenerationError(f"the server at {self._url} sent an odd {path} answer")
        return data

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        key = (text, add_bos, special)
        hit = self._cache.get(key)
        if hit is not None:
            return list(hit)
        body = {
            "content": text.decode("utf-8", errors="replace"),
            "add_special": add_bos,
            "parse_special": special,
        }
        tokens = self._post("/tokenize", body).get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise GenerationError(f"the server at {self._url} sent no token ids for /tokenize")
        if len(text) <= MAX_CACHED_CHARS:
            with self._lock:
                self._cache[key] = tuple(tokens)
                while len(self._cache) > MAX_CACHED:
                    self._cache.popitem(last=False)
        return tokens

    def control_ids(self) -> frozenset[int]:
        """The control tokens the chat markup uses (what the server says of its vocabulary)."""
        return self._controls

    def detokenize(self, tokens: Sequence[int]) -> str:
        content = self._post("/detokenize", {"tokens": list(tokens)}).get("content", "")
        return content if isinstance(content, str) else ""

    def check_plain_text(self, template: ChatTemplate) -> None:
        """Refuse a server that turns chat markup in content into control tokens.

        A ``<|...|>`` marker that is one token with special parsing is a control token; every
        piece of markup tokenized as content must contain none of them.
        """
        control: set[int] = set()
        for marker in template_markers(template):
            if not (marker.startswith("<|") and marker.endswith("|>")):
                continue
            ids = self.tokenize(marker.encode("utf-8"), add_bos=False, special=True)
            plain = self.tokenize(marker.encode("utf-8"), add_bos=False, special=False)
            if len(ids) == 1 and ids != plain:
                control.add(ids[0])
        self._controls = frozenset(control)
        if not control:
            raise ModelError(
                f"the server at {self._url} does not tell chat markup from text in /tokenize "
                "(parse_special is not honoured), so user text could open turns of its own. "
                "Set the role's path to the model's GGUF file to tokenize here instead."
            )
        leaks = plain_text_leaks(template, self, control.__contains__)
        if leaks:
            raise ModelError(
                f"the model at {self._url} turns the chat markup "
                f"{', '.join(repr(m) for m in leaks[:4])} into control tokens even in plain "
                "text, so users could write their own turns; use another GGUF file."
            )
