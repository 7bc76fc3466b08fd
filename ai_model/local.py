"""A GGUF model loaded with llama-cpp-python, streaming replies without blocking the event loop."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ai_model.base import BACKGROUND_CHUNK, ModelError
from ai_model.config import ModelSettings, SamplingSettings
from ai_model.handoff import DONE, Handoff
from ai_model.jinja_format import template_for, token_text
from ai_model.sampling import Grammar
from ai_model.slots import SlotPool, common_prefix
from ai_model.templates import ChatTemplate

log = logging.getLogger(__name__)

MAX_REMEMBERED_REPLIES = 4096


def _llama_kwargs(settings: ModelSettings, path: Path) -> dict[str, Any]:
    """Translate our settings into ``llama_cpp.Llama`` keyword arguments."""
    import llama_cpp

    kv_type = getattr(llama_cpp, f"GGML_TYPE_{settings.kv_cache_type.upper()}")
    rope = {
        "auto": llama_cpp.LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED,
        "none": llama_cpp.LLAMA_ROPE_SCALING_TYPE_NONE,
        "linear": llama_cpp.LLAMA_ROPE_SCALING_TYPE_LINEAR,
        "yarn": llama_cpp.LLAMA_ROPE_SCALING_TYPE_YARN,
    }[settings.rope_scaling_type]
    split = {
        "none": llama_cpp.LLAMA_SPLIT_MODE_NONE,
        "layer": llama_cpp.LLAMA_SPLIT_MODE_LAYER,
        "row": llama_cpp.LLAMA_SPLIT_MODE_ROW,
    }[settings.split_mode]
    threads = settings.threads or max(1, os.cpu_count() or 1)
    kwargs: dict[str, Any] = dict(
        model_path=str(path),
        n_ctx=settings.n_ctx,
        n_batch=settings.n_batch,
        n_ubatch=min(settings.n_batch, 512),
        n_gpu_layers=settings.n_gpu_layers,
        main_gpu=settings.main_gpu,
        split_mode=split,
        flash_attn=settings.flash_attn,
        type_k=kv_type,
        type_v=kv_type,
        rope_scaling_type=rope,
        n_threads=threads,
        n_threads_batch=settings.threads_batch or threads,
        verbose=False,
    )
    if settings.rope_scaling_type != "auto" and settings.rope_scaling_factor != 1.0:
        # llama.cpp takes the inverse: linear scaling by 2 means positions advance at 0.5.
        kwargs["rope_freq_scale"] = 1.0 / settings.rope_scaling_factor
    return kwargs


def special_token_check(llm: Any) -> Callable[[int], bool]:
    """Whether a token id of ``llm``'s vocabulary is a control token, or a user-defined one
    that is more than whitespace (Gemma's vocabulary defines runs of newlines that way: they
    can frame no turn)."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)

    def check(token: int) -> bool:
        attr = llama_cpp.llama_vocab_get_attr(vocab, token)
        if attr & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL:
            return True
        if attr & llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED:
            text = llama_cpp.llama_vocab_get_text(vocab, token) or b""
            return bool(text.strip())
        return False

    return check


def stop_at_control_tokens(llm: Any) -> None:
    """Make ``llm``'s sampler end the reply at any control token that is not end-of-turn.

    llama-cpp-python's generation loop only stops at end-of-generation tokens: a model that
    writes a turn header (``<|im_start|>``) would go on writing a turn of its own, shown as
    text and kept in the cache.  Here such a token is replaced, as it is sampled, by the
    end-of-sequence token, so the reply ends there and the token is never evaluated or kept
    (the batched scheduler does the same at the same point).
    """
    import llama_cpp

    if getattr(llm.sample, "ends_at_control_tokens", False):
        return  # another LocalModel on the same weights did it
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    eos = int(llama_cpp.llama_vocab_eos(vocab))
    if eos < 0:
        eos = int(llama_cpp.llama_vocab_eot(vocab))
    sample = llm.sample

    def sample_or_end(*args: Any, **kwargs: Any) -> int:
        token = int(sample(*args, **kwargs))
        if llama_cpp.llama_vocab_is_control(vocab, token) and not llama_cpp.llama_vocab_is_eog(
            vocab, token
        ):
            return eos
        return token

    sample_or_end.ends_at_control_tokens = True  # type: ignore[attr-defined]
    llm.sample = sample_or_end


def llama_template(settings: ModelSettings, llm: Any, path: Path) -> ChatTemplate:
    """The checked chat format of a loaded ``llama_cpp.Llama`` (see :func:`template_for`)."""

    def piece(token: int) -> bytes:
        return bytes(llm.detokenize([token], special=True))

    return template_for(
        settings.chat_template,
        llm.metadata.get("tokenizer.chat_template"),
        llm,
        bos=token_text(piece, llm.token_bos()),
        eos=token_text(piece, llm.token_eos()),
        adds_bos=tuple(llm.tokenize(b"", add_bos=True, special=True)),
        is_control=special_token_check(llm),
        model=path.name,
    )


def state_fingerprint(settings: ModelSettings, path: Path) -> str:
    """What a saved state must have been written under: the same file and load settings."""
    stat = path.stat()
    return hashlib.sha256(
        repr((str(path), stat.st_size, stat.st_mtime_ns, settings.load_key())).encode()
    ).hexdigest()


class LocalModel:
    """One loaded GGUF file.  Implements :class:`ai_model.base.ChatModel`.

    llama.cpp holds one KV cache per loaded model, so generations run one at a time on a
    dedicated thread; :class:`asyncio.Lock` wakes waiters in arrival order, which makes the queue
    fair.
    """

    def __init__(
        self,
        llm: Any,
        name: str,
        template: ChatTemplate,
        n_ctx: int,
        *,
        cache_slots: int = 1,
        state_dir: Path | None = None,
        fingerprint: str = "",
        state_dir_max_mb: int = 4096,
    ) -> None:
        self._llm = llm
        stop_at_control_tokens(llm)
        self.slots = SlotPool(
            llm,
            cache_slots,
            state_dir,
            fingerprint,
            max_disk_bytes=state_dir_max_mb * 2**20,
            is_control=special_token_check(llm),
        )
        self.name = name
        self.template = template
        # llama.cpp rounds the context up (8191 -> 8192); the configured size is the promise.
        self.n_ctx: int = min(n_ctx, int(llm.n_ctx()))
        # add_bos=True yields [BOS] only when the model's vocabulary asks for one.
        self.bos: tuple[int, ...] = tuple(llm.tokenize(b"", add_bos=True, special=True))
        self._turn = asyncio.Lock()
        # Per conversation, the tokens of its last reply; bounded, since conversations are not.
        self._generated: OrderedDict[str | None, tuple[int, ...]] = OrderedDict()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{name}")

    @classmethod
    def load(cls, settings: ModelSettings, path: Path, name: str) -> LocalModel:
        """Load the file (blocking: call it off the event loop)."""
        from llama_cpp import Llama

        try:
            llm = Llama(**_llama_kwargs(settings, path))
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelError(f"could not load model {path}: {exc}") from exc
        try:
            template = llama_template(settings, llm, path)
        except ModelError:
            llm.close()
            raise
        fingerprint = state_fingerprint(settings, path)
        return cls(
            llm,
            name,
            template,
            settings.n_ctx,
            cache_slots=settings.cache_slots,
            state_dir=Path(settings.state_dir) if settings.state_dir else None,
            fingerprint=fingerprint,
            state_dir_max_mb=settings.state_dir_max_mb,
        )

    @property
    def llama(self) -> Any:
        """The underlying ``llama_cpp.Llama`` (for benchmarks comparing against raw use)."""
        return self._llm

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        return list(self._llm.tokenize(text, add_bos=add_bos, special=special))

    def generated(self, slot: str | None) -> Sequence[int]:
        return self._generated.get(slot, ())

    def upcoming(self, slot: str | None) -> None:
        """One reply at a time: nothing to gather."""

    def detokenize(self, tokens: Sequence[int]) -> str:
        return bytes(self._llm.detokenize(list(tokens))).decode("utf-8", errors="replace")

    async def stream(
        self,
        tokens: Sequence[int],
        sampling: SamplingSettings,
        stop: Sequence[str] = (),
        slot: str | None = None,
        background: bool = False,
        grammar: Grammar | None = None,
    ) -> AsyncIterator[str]:
        """Yield reply text pieces for the prompt ``tokens``, waiting for our turn first.

        ``slot`` names the conversation, so that its evaluated state is kept and reused.
        ``grammar`` is not held on this serial path (llama-cpp-python's completion takes no
        lazy grammar): the caller validates what comes back, as it always does.
        """
        loop = asyncio.get_running_loop()
        handoff = Handoff()
        emit, cancel = handoff.emit, handoff.cancel
        prompt = list(tokens)
        stops = self.template.stops_with(sampling.stop, stop)

        def work() -> None:
            try:
                self.slots.activate(slot, prompt)
                if background and not self._prefill(prompt, cancel):
                    return  # nobody listens any more: the reply waiting for the turn goes next
                chunks = self._completion(prompt, sampling, stops)
                for chunk in chunks:
                    if cancel.is_set():
                        break
                    text = chunk["choices"][0]["text"]
                    if text:
                        emit(text)
                # Keep the reply's own tokens: re-tokenizing its text can differ, and the next
                # prompt would then miss the KV cache from the reply on.
                llm = self._llm
                produced = llm.input_ids[len(prompt) : llm.n_tokens]
                self._generated[slot] = tuple(int(t) for t in produced)
                self._generated.move_to_end(slot)
                while len(self._generated) > MAX_REMEMBERED_REPLIES:
                    self._generated.popitem(last=False)
            except Exception as exc:  # reported to the awaiting coroutine, not lost
                emit(exc)
            finally:
                emit(DONE)

        await self._turn.acquire()
        try:
            job = loop.run_in_executor(self._executor, work)
        except BaseException:
            self._turn.release()
            raise
        # The turn ends when the thread does, not when the consumer stops listening: a cancelled
        # consumer must not let the next request race this one on the KV cache.
        job.add_done_callback(lambda _: self._turn.release())
        async for piece in handoff.pieces():
            yield piece

    def _prefill(self, prompt: list[int], cancel: threading.Event) -> bool:
        """Evaluate all but the last token of ``prompt`` in small steps, stopping early once
        ``cancel`` is set; return whether it got to the end (blocking; on the model's thread).

        ``create_completion`` evaluates a prompt in one call that cannot be interrupted: a
        summary's 2,000-token prompt would hold every reply queued behind it for seconds on a
        CPU.  After this, it finds the prompt cached but for its last token.
        """
        llm = self._llm
        end = len(prompt) - 1
        done = common_prefix(llm.input_ids[: llm.n_tokens], prompt[:end])
        llm.n_tokens = done  # eval() drops the cache from here on
        while done < end:
            if cancel.is_set():
                return False
            step = prompt[done : min(end, done + BACKGROUND_CHUNK)]
            llm.eval(step)
            done += len(step)
        return not cancel.is_set()

    def raw_token_times(self, tokens: Sequence[int], sampling: SamplingSettings) -> list[float]:
        """Blocking, for benchmarks: stream with ``llama_cpp.Llama`` directly, from an empty
        cache, and return when each piece arrived (the baseline the core is compared to)."""
        self._llm.reset()
        return [time.perf_counter() for _ in self._completion(list(tokens), sampling, [])]

    def _completion(
        self, prompt: list[int], sampling: SamplingSettings, stops: list[str]
    ) -> Iterator[Any]:
        """The streaming llama.cpp call (blocking; on the model's thread)."""
        # llama-cpp-python reads the penalty window from this attribute when it builds the
        # sampler; only one generation runs at a time, so setting it per request is safe.
        self._llm.last_n_tokens_size = sampling.repeat_last_n
        chunks: Iterator[Any] = self._llm.create_completion(
            prompt=prompt,
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            min_p=sampling.min_p,
            repeat_penalty=sampling.repeat_penalty,
            stop=stops,
            seed=None if sampling.seed < 0 else sampling.seed,
            stream=True,
        )
        return chunks

    def close(self) -> None:
        """Finish the running generation, save conversation states, free llama.cpp."""
        self._executor.shutdown(wait=True)
        saved = self.slots.save_all()
        if saved:
            log.info("%s: saved %d conversation state(s)", self.name, saved)
        self.slots.close()
        close = getattr(self._llm, "close", None)
        if close is not None:
            close()
