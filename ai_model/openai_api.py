"""An OpenAI-compatible completions server (vLLM, llama-server's ``/v1``): ``/v1/models`` and
``/v1/completions`` with a token-id prompt, streamed until ``[DONE]``."""

from __future__ import annotations

from typing import Any

import httpx

from ai_model.base import ModelError
from ai_model.config import ModelSettings, SamplingSettings
from ai_model.remote import Event, ServerInfo, ask_json, int_or_none
from ai_model.sampling import Grammar

KIND = "OpenAI-compatible server"


class OpenAIDialect:
    """Implements :class:`ai_model.remote.Dialect` for ``/v1/completions``."""

    kind = KIND

    def probe(self, http: httpx.Client, url: str, settings: ModelSettings) -> ServerInfo:
        listing = ask_json(http, KIND, url, "/v1/models", settings)
        entries = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(entries, list):
            raise ModelError(f"{KIND} at {url}/v1/models did not list its models")
        entry: dict[str, Any] | None = None
        for candidate in entries:
            names = [candidate.get("id"), *(candidate.get("aliases") or [])]
            if settings.model in names:
                entry = candidate
        if entry is None:
            served = ", ".join(str(c.get("id")) for c in entries[:5]) or "nothing"
            raise ModelError(
                f"{KIND} at {url} does not serve the model {settings.model!r} (it serves: "
                f"{served}); fix the role's model setting"
            )
        meta = entry.get("meta") or {}
        n_ctx = int_or_none(entry.get("max_model_len")) or int_or_none(meta.get("n_ctx"))
        slots = None
        template = None
        # llama-server behind /v1 also has /props: its slots let conversations keep theirs.
        try:
            response = http.get(f"{url}/props")
            props = response.json() if response.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            props = {}
        if isinstance(props, dict):
            slots = int_or_none(props.get("total_slots"))
            template = props.get("chat_template") or None
            general = props.get("default_generation_settings") or {}
            n_ctx = int_or_none(general.get("n_ctx")) or n_ctx
        return ServerInfo(
            n_ctx=n_ctx,
            n_vocab=int_or_none(meta.get("n_vocab")),
            slots=slots,
            chat_template=template,
        )

    def request(
        self,
        prompt: list[int],
        sampling: SamplingSettings,
        stops: list[str],
        slot: int | None,
        settings: ModelSettings,
        grammar: Grammar | None = None,  # not held: vLLM's grammars are not GBNF
    ) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "model": settings.model,
            "prompt": prompt,
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "stop": stops,
            "stream": True,
            # Not in OpenAI's API; vLLM and llama-server read them, others ignore them.
            "top_k": sampling.top_k,
            "min_p": sampling.min_p,
            "repetition_penalty": sampling.repeat_penalty,  # vLLM's name
            "repeat_penalty": sampling.repeat_penalty,  # llama-server's
            "repeat_last_n": sampling.repeat_last_n,
            "cache_prompt": True,
        }
        if sampling.seed >= 0:
            body["seed"] = sampling.seed
        if slot is not None:
            body["id_slot"] = slot
        return "/v1/completions", body

    def event(self, data: Any) -> Event:
        if data == "[DONE]":
            return Event("", done=True)
        choices = data.get("choices") if isinstance(data, dict) else None
        if not choices or not isinstance(choices[0], dict):
            return Event("")
        return Event(str(choices[0].get("text") or ""))
