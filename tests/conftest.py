"""Shared fixtures: settings on a temporary SQLite file, the real embedded model, providers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ai_model.base import ChatModel
from ai_model.config import ModelSettings
from ai_model.embedded import embedded_model_path
from ai_model.local import LocalModel
from chat.core import ConversationCore
from chat.settings import Settings, parse_settings
from storage import Store, open_database


def make_settings(tmp_path: Path, raw: Mapping[str, Any] | None = None, **changes: Any) -> Settings:
    settings = parse_settings(raw or {}, env={})
    # Tests send bursts no person would; the fair-share limits have tests of their own.
    changes.setdefault("rate_limit", 0)
    changes.setdefault("database_url", f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    return replace(settings, **changes)


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative paths (the default state folder, data/) land in the test's own folder."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """One throwaway PostgreSQL server for the session (``tests.postgres``)."""
    from tests.postgres import start_server

    yield from start_server()


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One real llama-server (embedded model, 4 slots of 8192) for the session."""
    from tests.llama_server import serve

    yield from serve(tmp_path_factory.mktemp("llama-server"))


@pytest.fixture
def backend() -> str:
    """The database the ``settings`` point at.  Modules whose tests must hold on both
    override it: ``@pytest.fixture(params=BACKENDS)``."""
    return "sqlite"


BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture
async def database_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == "postgresql":
        server = request.getfixturevalue("postgres")
        return str(await server.new_database())
    return f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return make_settings(tmp_path, database_url=database_url)


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    store = Store(await open_database(settings.database_url))
    yield store
    await store.close()


class FixedModels:
    """A model provider that serves given models per role and records what was asked."""

    def __init__(self, models: Mapping[str, ChatModel]) -> None:
        self.models = dict(models)
        self.requested: list[str] = []

    async def get(self, role: str) -> ChatModel:
        self.requested.append(role)
        return self.models[role]


@pytest.fixture
def make_core(settings: Settings, store: Store):  # type: ignore[no-untyped-def]
    def make(served: Mapping[str, ChatModel], **changes: Any) -> ConversationCore:
        return ConversationCore(replace(settings, **changes), store, FixedModels(served))

    return make


@pytest.fixture
async def telegram() -> AsyncIterator[Any]:
    """A local Bot API server (``tests.fake_telegram``) for the real python-telegram-bot."""
    from tests.fake_telegram import FakeTelegram

    server = FakeTelegram()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="session")
def smollm_llama() -> Iterator[Any]:
    """One real llama.cpp instance of the embedded model for the whole session."""
    from llama_cpp import Llama

    from ai_model.local import _llama_kwargs

    llm = Llama(**_llama_kwargs(ModelSettings(), embedded_model_path()))
    yield llm
    llm.close()


@pytest.fixture
def smollm(smollm_llama: Any) -> Iterator[LocalModel]:
    """The embedded SmolLM2 model behind the real :class:`LocalModel` (per-test event loop)."""
    from ai_model.local import llama_template

    template = llama_template(ModelSettings(), smollm_llama, embedded_model_path())
    model = LocalModel(smollm_llama, "SmolLM2-135M-Instruct", template, ModelSettings().n_ctx)
    yield model
    model._executor.shutdown(wait=True)


def record_prompts(model: Any) -> list[list[int]]:
    """The prompts of conversations (a slot named) that ``model`` is asked to stream, from now
    on; background jobs (summaries, no slot) are left out."""
    prompts: list[list[int]] = []
    original = model.stream

    def recording(tokens, sampling, stop=(), slot=None, background=False, grammar=None):  # type: ignore[no-untyped-def]
        if slot is not None:
            prompts.append(list(tokens))
        return original(tokens, sampling, stop, slot, background, grammar)

    model.stream = recording
    return prompts
