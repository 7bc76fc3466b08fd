"""Model roles → loaded models: checked at start-up, loaded lazily once, shared when identical."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ai_model.base import ChatModel, ModelError, ModelFileMissing, ModelUsage
from ai_model.batched import BatchedModel
from ai_model.config import ModelSettings
from ai_model.embedded import EMBEDDED_NAME, EmbeddedModelMissing, embedded_model_path
from ai_model.local import LocalModel
from ai_model.memory_plan import ModelPlan, plan_model, read_shape
from ai_model.remote import Dialect, RemoteModel
from ai_model.vocab import VocabModel

Loaded = BatchedModel | LocalModel | VocabModel | RemoteModel


def dialect_for(backend: str) -> Dialect:
    """The engine a remote backend talks to (imported lazily: local use needs neither)."""
    if backend == "llama-server":
        from ai_model.llama_server import LlamaServerDialect

        return LlamaServerDialect()
    from ai_model.openai_api import OpenAIDialect

    return OpenAIDialect()


log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """A role's settings with its file located (``None``: served remotely, no file here)."""

    role: str
    settings: ModelSettings
    path: Path | None
    embedded: bool

    @property
    def display_name(self) -> str:
        if self.embedded:
            return EMBEDDED_NAME
        if self.path is not None:
            return self.path.name
        return self.settings.model or "the served model"


def resolve(role: str, settings: ModelSettings, base_dir: Path | None = None) -> ResolvedModel:
    """Locate the GGUF file of ``role``; raise :class:`ModelFileMissing` with advice if absent.

    Relative paths are taken from ``base_dir`` (the current directory by default).  A remote
    role without a path tokenizes through its server.
    """
    if settings.remote and not settings.path:
        return ResolvedModel(role, settings, None, False)
    if not settings.path:
        try:
            return ResolvedModel(role, settings, embedded_model_path(), True)
        except EmbeddedModelMissing as exc:
            raise ModelFileMissing(f"{role} model: {exc}") from exc
    path = Path(settings.path).expanduser()
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    if not path.is_file():
        where = (
            f"download it from {settings.download_url}"
            if settings.download_url
            else "download the GGUF file"
        )
        raise ModelFileMissing(
            f"model file for the {role} role not found: {path}\n"
            f'  {where} and save it at that path, or set [models.{role}] path = "" '
            "to use the embedded SmolLM2 model."
        )
    return ResolvedModel(role, settings, path.resolve(), False)


class ModelRegistry:
    """Serves a :class:`ChatModel` per role; roles with the same file and settings share one."""

    def __init__(
        self,
        models: Mapping[str, ModelSettings],
        base_dir: Path | None = None,
        *,
        vocab_only: bool = False,
    ) -> None:
        # Resolving first makes a missing file stop start-up, before any platform connects.
        self.resolved = {role: resolve(role, s, base_dir) for role, s in models.items()}
        # vocab_only: tokenizers and templates without weights (for commands that only count).
        self.vocab_only = vocab_only
        self._loaded: dict[tuple[object, ...], Loaded] = {}
        self._locks: dict[tuple[object, ...], asyncio.Lock] = {}

    def _key(self, role: str) -> tuple[object, ...]:
        r = self.resolved[role]
        s = r.settings
        if s.remote:
            remote = (s.backend, s.url.rstrip("/"), s.model, s.api_key, s.parallel)
            return ("remote", *remote, s.request_timeout_s, s.retries, str(r.path), s.n_ctx)
        serving = (
            *(s.parallel, s.prefill_chunk, s.park_mb, s.shared_prefix_mb),
            *(s.cache_slots, s.state_dir),
        )
        return (str(r.path), *s.load_key()[1:], *serving)

    def shares_model(self, role_a: str, role_b: str) -> bool:
        return self._key(role_a) == self._key(role_b)

    def describe(self) -> list[str]:
        """One line per role: which file serves it, and how (for the start-up log)."""
        lines = []
        for role, r in self.resolved.items():
            s = r.settings
            shared = [o for o in self.resolved if o != role and self.shares_model(role, o)]
            also = f", shared with {', '.join(shared)}" if shared else ""
            if s.remote:
                vocab = f"tokenized with {r.path}" if r.path else "tokenized by the server"
                lines.append(
                    f"{role} role -> {s.backend} at {s.url} ({r.display_name}, {vocab}), "
                    f"ctx {s.n_ctx}, up to {s.parallel} requests at once{also}"
                )
                continue
            serving = (
                f"{s.parallel} conversations at once" if s.parallel > 1 else "one reply at a time"
            )
            lines.append(
                f"{role} role -> {r.display_name} ({r.path}), ctx {s.n_ctx}, {serving}, "
                f"gpu layers {s.n_gpu_layers} on gpu {s.main_gpu}, template {s.chat_template}"
                + also
            )
        return lines

    async def get(self, role: str) -> ChatModel:
        """The loaded model for ``role``, loading it (off the event loop) on first use."""
        if role not in self.resolved:
            raise ModelError(f"no model configured for role {role!r}")
        key = self._key(role)
        model = self._loaded.get(key)
        if model is not None:
            return model
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            model = self._loaded.get(key)
            if model is None:
                r = self.resolved[role]
                log.info("loading %s for the %s role ...", r.display_name, role)
                loaded: Loaded
                if r.settings.remote and (r.path is None or not self.vocab_only):
                    dialect = dialect_for(r.settings.backend)
                    try:
                        loaded = await asyncio.to_thread(
                            RemoteModel.load, r.settings, r.path, r.display_name, dialect
                        )
                    except ModelError as exc:
                        raise ModelError(f"{role} model: {exc}") from exc
                elif r.path is None:  # pragma: no cover - resolve() gives local roles a path
                    raise ModelError(f"{role} model: no file")
                elif self.vocab_only:
                    loaded = await asyncio.to_thread(
                        VocabModel.load, r.settings, r.path, r.display_name
                    )
                elif r.settings.parallel > 1:
                    loaded = await asyncio.to_thread(
                        BatchedModel.load, r.settings, r.path, r.display_name
                    )
                else:
                    loaded = await asyncio.to_thread(
                        LocalModel.load, r.settings, r.path, r.display_name
                    )
                model = loaded
                log.info(
                    "%s loaded (template %s, ctx %d)",
                    r.display_name,
                    model.template.name,
                    model.n_ctx,
                )
                self._loaded[key] = model
        return model

    def memory_plans(self) -> list[ModelPlan]:
        """The memory each model to load here will take (blocking: reads files' metadata).
        Remote roles are left out: their server holds the memory."""
        plans: dict[tuple[object, ...], ModelPlan] = {}
        for role, r in self.resolved.items():
            key = self._key(role)
            if r.settings.remote or r.path is None or key in plans:
                continue
            plans[key] = plan_model(
                f"{self._roles_of(key)} role", r.settings, r.path, read_shape(r.path)
            )
        return list(plans.values())

    def loaded(self, role: str) -> bool:
        """Whether ``role``'s model is loaded (or its remote server reached) already."""
        return role in self.resolved and self._key(role) in self._loaded

    def usage(self) -> dict[str, ModelUsage]:
        """Each loaded model's queue, sequences and prompt totals, by the roles it serves
        joined with "+" (for the metrics); backends that do not know them are left out."""
        found: dict[str, ModelUsage] = {}
        for key, model in self._loaded.items():
            read = getattr(model, "usage", None)
            if read is None:
                continue
            found[self._roles_of(key)] = read()
        return found

    def _roles_of(self, key: tuple[object, ...]) -> str:
        """The roles one loaded model serves, joined with "+"."""
        return "+".join(r for r in self.resolved if self._key(r) == key)

    async def connect(self) -> None:
        """Reach every remote role's server now: one that is down, or that serves another
        model, stops start-up here with a message naming its URL."""
        for role, r in self.resolved.items():
            if r.settings.remote:
                await self.get(role)

    async def aclose(self) -> None:
        """Close the remote models' stream connections, then everything else."""
        for model in self._loaded.values():
            if isinstance(model, RemoteModel):
                await model.aclose()
        self.close()

    def close(self) -> None:
        for model in self._loaded.values():
            model.close()
        self._loaded.clear()
