"""A GGUF model served by the batched scheduler: many conversations generate at once.

One llama.cpp context per loaded model holds ``parallel`` sequences in one KV pool of
``parallel`` × ``n_ctx`` cells, so four channels cost one context's compute buffers instead of
four.  The pool is split into one stream per sequence (``kv_unified`` off): with a unified
buffer, a sequence's attention runs over cells placed wherever the other conversations left
room, and its reply then depends, by rounding, on who else is resident; per-sequence streams
keep a conversation's reply the one it gets alone (and the one the serial path gives).

:mod:`ai_model.scheduler` decodes the sequences together; this module loads the file, checks
it, and adapts the scheduler to the :class:`ai_model.base.ChatModel` protocol.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ai_model.base import BACKGROUND_CHUNK, GenerationError, ModelError, ModelUsage
from ai_model.config import ModelSettings, SamplingSettings
from ai_model.handoff import Handoff
from ai_model.jinja_format import template_for, token_text
from ai_model.local import _llama_kwargs, special_token_check, state_fingerprint
from ai_model.parking import Parking, StateFiles
from ai_model.requests import Request
from ai_model.sampling import Grammar
from ai_model.scheduler import Scheduler
from ai_model.templates import ChatTemplate

log = logging.getLogger(__name__)
_backend = threading.Lock()


def _init_backend() -> None:
    """llama.cpp's one-time process set-up, shared with ``llama_cpp.Llama``'s flag."""
    import llama_cpp
    from llama_cpp import Llama
    from llama_cpp._logger import set_verbose

    set_verbose(False)  # llama.cpp's own log lines: only errors, as llama_cpp.Llama does
    with _backend:
        flag = "_Llama__backend_initialized"
        if not getattr(Llama, flag, False):
            llama_cpp.llama_backend_init()
            setattr(Llama, flag, True)


def _load(settings: ModelSettings, path: Path) -> tuple[Any, Any]:
    """The weights and one context of ``parallel`` sequences (blocking)."""
    import llama_cpp
    from llama_cpp import _internals

    _init_backend()
    kw = _llama_kwargs(settings, path)
    mparams = llama_cpp.llama_model_default_params()
    layers = kw["n_gpu_layers"]
    mparams.n_gpu_layers = 0x7FFFFFFF if layers == -1 else layers
    mparams.main_gpu = kw["main_gpu"]
    mparams.split_mode = kw["split_mode"]
    model: Any = _internals.LlamaModel(path_model=str(path), params=mparams, verbose=False)
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = settings.parallel * settings.n_ctx
    cparams.n_batch = settings.n_batch
    cparams.n_ubatch = kw["n_ubatch"]
    cparams.n_seq_max = settings.parallel
    cparams.kv_unified = False
    cparams.n_threads = kw["n_threads"]
    cparams.n_threads_batch = kw["n_threads_batch"]
    cparams.rope_scaling_type = kw["rope_scaling_type"]
    cparams.rope_freq_scale = kw.get("rope_freq_scale", 0.0)
    cparams.flash_attn_type = (
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        if settings.flash_attn
        else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    cparams.type_k = kw["type_k"]
    cparams.type_v = kw["type_v"]
    cparams.no_perf = True
    try:
        ctx = _internals.LlamaContext(model=model, params=cparams, verbose=False)
    except BaseException:
        model.close()
        raise
    return model, ctx


@dataclass(frozen=True, slots=True)
class ModelDimensions:
    """What a model's compute per token follows from."""

    layers: int
    heads: int
    kv_heads: int
    embd: int
    params: int
    vocab: int


class BatchedModel:
    """One loaded GGUF file, generating for up to ``parallel`` conversations at once.

    Implements :class:`ai_model.base.ChatModel`.
    """

    def __init__(
        self,
        model: Any,
        ctx: Any,
        name: str,
        template: ChatTemplate,
        settings: ModelSettings,
        fingerprint: str,
    ) -> None:
        self._model = model
        self._ctx = ctx
        self._closed = False
        # Tokenizer calls run on worker threads; close() waits for those in flight before it
        # frees the vocabulary they read.
        self._users = 0
        self._users_done = threading.Condition()
        self.name = name
        self.template = template
        self.n_ctx = settings.n_ctx
        self.parallel = settings.parallel
        self.bos: tuple[int, ...] = tuple(model.tokenize(b"", True, True))
        state_dir = settings.state_dir
        self._files = (
            StateFiles(Path(state_dir), fingerprint, settings.state_dir_max_mb * 2**20)
            if state_dir and settings.state_dir_max_mb > 0
            else None
        )
        parking = Parking(settings.park_mb * 2**20, self._files, settings.n_ctx)
        self.scheduler = Scheduler(
            name,
            ctx,
            model.vocab,
            parallel=settings.parallel,
            n_batch=settings.n_batch,
            prefill_chunk=settings.prefill_chunk,
            parking=parking,
            shared_prefix_bytes=settings.shared_prefix_mb * 2**20,
            wait_s=settings.batch_wait_ms / 1000,
            openings=[
                tuple(model.tokenize(text.encode(), False, True))
                for text in set(template.open.values())
            ],
        )

    @classmethod
    def load(cls, settings: ModelSettings, path: Path, name: str) -> BatchedModel:
        """Load the file (blocking: call it off the event loop)."""
        try:
            model, ctx = _load(settings, path)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelError(f"could not load model {path}: {exc}") from exc
        try:
            template = template_for(
                settings.chat_template,
                model.metadata().get("tokenizer.chat_template"),
                _Tokenizer(model),
                bos=token_text(lambda t: model.token_to_piece(t, special=True), model.token_bos()),
                eos=token_text(lambda t: model.token_to_piece(t, special=True), model.token_eos()),
                adds_bos=tuple(model.tokenize(b"", True, True)),
                is_control=special_token_check(model),
                model=path.name,
            )
        except ModelError:
            ctx.close()
            model.close()
            raise
        return cls(model, ctx, name, template, settings, state_fingerprint(settings, path))

    def dimensions(self) -> ModelDimensions:
        """The loaded model's shape, for the bench's compute floors."""
        import llama_cpp

        weights = self._open().model
        return ModelDimensions(
            layers=int(llama_cpp.llama_model_n_layer(weights)),
            heads=int(llama_cpp.llama_model_n_head(weights)),
            kv_heads=int(llama_cpp.llama_model_n_head_kv(weights)),
            embd=int(llama_cpp.llama_model_n_embd(weights)),
            params=int(llama_cpp.llama_model_n_params(weights)),
            vocab=int(self._model.n_vocab()),
        )

    def _open(self) -> Any:
        if self._closed:
            raise ModelError(f"{self.name} is closed")
        return self._model

    @contextlib.contextmanager
    def _vocab(self) -> Iterator[Any]:
        """The weights, held open for one tokenizer call (any thread)."""
        with self._users_done:
            model = self._open()
            self._users += 1
        try:
            yield model
        finally:
            with self._users_done:
                self._users -= 1
                self._users_done.notify_all()

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        with self._vocab() as model:
            return list(model.tokenize(text, add_bos, special))

    def detokenize(self, tokens: Sequence[int]) -> str:
        with self._vocab() as model:
            return bytes(model.detokenize(list(tokens))).decode("utf-8", errors="replace")

    def generated(self, slot: str | None) -> Sequence[int]:
        return self.scheduler.generated.get(slot, ())

    def usage(self) -> ModelUsage:
        return self.scheduler.usage()

    def upcoming(self, slot: str | None) -> None:
        self.scheduler.announce(slot)

    async def stream(
        self,
        tokens: Sequence[int],
        sampling: SamplingSettings,
        stop: Sequence[str] = (),
        slot: str | None = None,
        background: bool = False,
        grammar: Grammar | None = None,
    ) -> AsyncIterator[str]:
        """Yield reply text pieces for the prompt ``tokens``; ``slot`` names the conversation,
        whose evaluated state is kept and reused; ``grammar`` holds the reply to a grammar
        (:mod:`ai_model.sampling`)."""
        self._open()
        prompt = tuple(tokens)
        if not prompt or len(prompt) >= self.n_ctx:
            raise GenerationError(
                f"generation failed: a prompt of {len(prompt)} tokens does not fit a window of "
                f"{self.n_ctx}"
            )
        handoff = Handoff()
        request = Request(
            key=slot,
            prompt=prompt,
            sampling=sampling,
            stops=tuple(self.template.stops_with(sampling.stop, stop)),
            max_tokens=min(sampling.max_tokens, self.n_ctx - len(prompt)),
            emit=handoff.emit,
            cancel=handoff.cancel,
            # A step never waits on more than this much of a background prompt.
            prefill_chunk=BACKGROUND_CHUNK if background else None,
            grammar=grammar,
        )
        self.scheduler.submit(request)
        # Leaving sets the cancel flag, which frees the sequence at the scheduler's next step.
        async for piece in handoff.pieces():
            yield piece

    def close(self) -> None:
        """Let running generations end, save conversation states, free llama.cpp."""
        with self._users_done:
            if self._closed:
                return
            self._closed = True
            while self._users:
                self._users_done.wait()
        self.scheduler.close()
        saved = 0
        if self._files is not None:
            for key, state in self.scheduler.held_states():
                saved += self._files.write(key, state)
            saved += self.scheduler.parking.flush()
            self._files.prune()
        if saved:
            log.info("%s: saved %d conversation state(s)", self.name, saved)
        self.scheduler.free()
        self._ctx.close()
        self._model.close()


class _Tokenizer:
    def __init__(self, model: Any) -> None:
        self._model = model

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        return list(self._model.tokenize(text, add_bos, special))
