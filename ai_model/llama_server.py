"""llama.cpp's own server, spoken to through its native API: ``/health``, ``/props``,
``/completion`` (streamed, with the token ids of every piece), ``/tokenize``."""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx

from ai_model.base import ModelError
from ai_model.config import ModelSettings, SamplingSettings
from ai_model.remote import Event, ServerInfo, ask_json, error_text, headers, int_or_none
from ai_model.sampling import Grammar

log = logging.getLogger(__name__)

KIND = "llama-server"
TRIGGER_PATTERN_FULL = 3  # common_grammar_trigger_type: a pattern the whole output matches


class LlamaServerDialect:
    """Implements :class:`ai_model.remote.Dialect` for llama-server."""

    kind = KIND

    def probe(self, http: httpx.Client, url: str, settings: ModelSettings) -> ServerInfo:
        wait_until = time.monotonic() + settings.request_timeout_s
        while True:
            try:
                response = http.get(f"{url}/health", headers=headers(settings))
            except httpx.HTTPError as exc:
                reason = str(exc) or type(exc).__name__
                raise ModelError(
                    f"cannot reach {KIND} at {url}/health: {reason}. Start the server, or fix "
                    "the role's url in the settings."
                ) from exc
            if response.status_code == 200:
                break
            # 503 while the server still loads its model: worth waiting for.
            if response.status_code != 503 or time.monotonic() > wait_until:
                try:
                    reason = error_text(response.json())
                except ValueError:
                    reason = response.text[:200]
                raise ModelError(
                    f"{KIND} at {url}/health answered HTTP {response.status_code}: {reason}"
                )
            log.info("%s at %s is still loading its model; waiting", KIND, url)
            time.sleep(1.0)
        props = ask_json(http, KIND, url, "/props", settings)
        if not isinstance(props, dict):
            raise ModelError(f"{KIND} at {url}/props did not describe the server")
        general = props.get("default_generation_settings") or {}
        n_vocab = None
        try:
            models = ask_json(http, KIND, url, "/v1/models", settings)
            meta = (models.get("data") or [{}])[0].get("meta") or {}
            n_vocab = int_or_none(meta.get("n_vocab"))
        except (ModelError, AttributeError, IndexError):
            pass  # older servers: the tokenization probe still compares vocabularies
        return ServerInfo(
            n_ctx=int_or_none(general.get("n_ctx")),
            n_vocab=n_vocab,
            slots=int_or_none(props.get("total_slots")),
            chat_template=props.get("chat_template") or None,
            bos_token=str(props.get("bos_token") or ""),
            eos_token=str(props.get("eos_token") or ""),
        )

    def request(
        self,
        prompt: list[int],
        sampling: SamplingSettings,
        stops: list[str],
        slot: int | None,
        settings: ModelSettings,
        grammar: Grammar | None = None,
    ) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "prompt": prompt,
            "n_predict": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_k": sampling.top_k,
            "top_p": sampling.top_p,
            "min_p": sampling.min_p,
            "repeat_penalty": sampling.repeat_penalty,
            "repeat_last_n": sampling.repeat_last_n,
            "stop": stops,
            "stream": True,
            "cache_prompt": True,
            "return_tokens": True,
        }
        if sampling.seed >= 0:
            body["seed"] = sampling.seed
        # No slot of this process's own: the server picks the idle slot whose cached prompt is
        # most like this one (prefix reuse), never one another process is using.
        body["id_slot"] = -1 if slot is None else slot
        if grammar is not None:
            body["grammar"] = grammar.gbnf
            if grammar.triggers:  # matched against the whole output, as in-process
                body["grammar_lazy"] = True
                body["grammar_triggers"] = [
                    {"type": TRIGGER_PATTERN_FULL, "value": t} for t in grammar.triggers
                ]
        return "/completion", body

    def event(self, data: Any) -> Event:
        if not isinstance(data, dict):
            return Event("")
        tokens = data.get("tokens") or ()
        return Event(
            str(data.get("content") or ""),
            tuple(t for t in tokens if isinstance(t, int)),
            done=data.get("stop") is True,
        )
