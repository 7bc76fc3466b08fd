"""How much memory the configured models will take, before any of them loads.

Per loaded model (roles with the same file and settings share one):

- weights: the file's size (llama.cpp maps it whole);
- KV cache: sequences × ``n_ctx`` × bytes per token, where a token takes K and V in every layer
  for every KV head (``n_layer × n_head_kv × (key length + value length)``, from the file's own
  metadata) at ``kv_cache_type``'s size.  The batched path has ``parallel`` sequences, the serial
  one ``cache_slots`` contexts.  Sliding-window layers (Gemma) are counted in full: an upper
  bound;
- ``park_mb`` and ``shared_prefix_mb`` (batched only), which fill as conversations come and go.

With layers on a GPU, that share of the weights and the KV cache is counted against the GPU's
free memory (read with ``nvidia-smi`` where there is one), the rest against available RAM.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ai_model.base import ModelError
from ai_model.config import ModelSettings

GB = 1024**3

# Bytes per cached element: f16 is 2; ggml's block formats store 32 values in a block.
KV_BYTES = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q5_1": 24 / 32,
    "q5_0": 22 / 32,
    "q4_1": 20 / 32,
    "q4_0": 18 / 32,
}


@dataclass(frozen=True, slots=True)
class Shape:
    """What the KV cache's size follows from, as the GGUF's metadata gives it."""

    layers: int
    kv_heads: int
    key_length: int
    value_length: int

    def kv_bytes_per_token(self, kv_cache_type: str) -> float:
        per_layer = self.kv_heads * (self.key_length + self.value_length)
        return self.layers * per_layer * KV_BYTES[kv_cache_type]


def shape_of(metadata: Mapping[str, str]) -> Shape:
    """The KV shape from a GGUF's metadata (``llama_cpp.Llama(...).metadata``)."""
    arch = metadata.get("general.architecture", "")

    def number(key: str, default: int | None = None) -> int:
        text = metadata.get(f"{arch}.{key}")
        if text is None:
            if default is None:
                raise ModelError(f"the model's metadata has no {arch}.{key}")
            return default
        return int(text)

    heads = number("attention.head_count")
    head_size = number("embedding_length") // max(heads, 1)
    return Shape(
        layers=number("block_count"),
        kv_heads=number("attention.head_count_kv", heads),
        key_length=number("attention.key_length", head_size),
        value_length=number("attention.value_length", head_size),
    )


def read_shape(path: Path) -> Shape:
    """Read ``path``'s metadata without its weights (blocking)."""
    from llama_cpp import Llama

    try:
        llm = Llama(model_path=str(path), vocab_only=True, n_ctx=256, verbose=False)
    except (ValueError, RuntimeError, OSError) as exc:
        raise ModelError(f"could not read {path}: {exc}") from exc
    try:
        return shape_of(llm.metadata)
    finally:
        llm.close()


@dataclass(frozen=True, slots=True)
class ModelPlan:
    """One loaded model's memory, in bytes, and where it goes."""

    roles: str
    file: str
    settings: ModelSettings
    weights: int
    kv_per_token: float
    sequences: int
    park: int
    shared: int
    gpu_share: float  # of the weights and KV cache: 0 on a CPU, 1 with every layer offloaded
    layers: int

    @property
    def kv(self) -> int:
        return int(self.sequences * self.settings.n_ctx * self.kv_per_token)

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.park + self.shared

    @property
    def on_gpu(self) -> int:
        return int((self.weights + self.kv) * self.gpu_share)

    @property
    def in_ram(self) -> int:
        return self.total - self.on_gpu

    def line(self) -> str:
        s = self.settings
        parts = [
            f"weights {self.weights / GB:.2f} GB",
            f"KV cache {self.sequences} × {s.n_ctx} tokens × {self.kv_per_token / 1024:.1f} KB "
            f"({s.kv_cache_type}) = {self.kv / GB:.2f} GB",
        ]
        if self.park or self.shared:
            parts.append(
                f"park_mb {self.park / GB:.2f} GB + shared_prefix_mb {self.shared / GB:.2f} GB"
            )
        where = ""
        if self.gpu_share:
            where = f"; {self.on_gpu / GB:.2f} GB of it on GPU {s.main_gpu}"
        return (
            f"memory plan, {self.roles} ({self.file}): {' + '.join(parts)}"
            f" = {self.total / GB:.2f} GB{where}"
        )


def plan_model(roles: str, settings: ModelSettings, path: Path, shape: Shape) -> ModelPlan:
    batched = settings.parallel > 1
    layers = shape.layers
    offloaded = layers if settings.n_gpu_layers < 0 else min(settings.n_gpu_layers, layers)
    return ModelPlan(
        roles=roles,
        file=path.name,
        settings=settings,
        weights=path.stat().st_size,
        kv_per_token=shape.kv_bytes_per_token(settings.kv_cache_type),
        sequences=settings.parallel if batched else settings.cache_slots,
        park=settings.park_mb * 2**20 if batched else 0,
        shared=settings.shared_prefix_mb * 2**20 if batched else 0,
        gpu_share=offloaded / layers if layers else 0.0,
        layers=layers,
    )


def available_ram() -> int | None:
    """``MemAvailable`` from /proc/meminfo (what can be used without swapping)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def gpu_free(index: int) -> int | None:
    """Free memory of GPU ``index`` by ``nvidia-smi``; None where it cannot be read."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return None
    try:
        out = subprocess.run(
            [tool, "--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i", str(index)],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
        return int(out.strip().splitlines()[0]) * 2**20
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def verdicts(plans: Iterable[ModelPlan], ram: int | None) -> list[tuple[bool, str]]:
    """(fits?, line) for RAM and for each GPU used, with what to lower when it does not fit."""
    plans = list(plans)
    out: list[tuple[bool, str]] = []
    need = sum(p.in_ram for p in plans)
    if ram is None:
        out.append((True, f"memory: {need / GB:.2f} GB of RAM needed (available RAM unknown)"))
    elif need <= ram:
        out.append((True, f"memory: {need / GB:.2f} GB of {ram / GB:.2f} GB available RAM: fits"))
    else:
        out.append(
            (
                False,
                f"memory: {need / GB:.2f} GB needed, {(need - ram) / GB:.2f} GB more "
                f"than the {ram / GB:.2f} GB of RAM available; {advice(plans)}",
            )
        )
    for gpu in sorted({p.settings.main_gpu for p in plans if p.gpu_share}):
        on_gpu = sum(p.on_gpu for p in plans if p.gpu_share and p.settings.main_gpu == gpu)
        free = gpu_free(gpu)
        if free is None:
            out.append((True, f"GPU {gpu}: {on_gpu / GB:.2f} GB needed (free memory unknown)"))
        elif on_gpu <= free:
            out.append((True, f"GPU {gpu}: {on_gpu / GB:.2f} GB of {free / GB:.2f} GB free: fits"))
        else:
            out.append(
                (
                    False,
                    f"GPU {gpu}: {on_gpu / GB:.2f} GB needed, {(on_gpu - free) / GB:.2f} "
                    f"GB more than the {free / GB:.2f} GB free; lower n_gpu_layers, "
                    "parallel or n_ctx",
                )
            )
    return out


def advice(plans: list[ModelPlan]) -> str:
    """What to lower, biggest saving first."""
    biggest = max(plans, key=lambda p: p.kv + p.park)
    s = biggest.settings
    per_sequence = s.n_ctx * biggest.kv_per_token / GB
    tips = [
        f"lower [models.*] parallel ({biggest.roles}: each sequence takes {per_sequence:.2f} GB)"
    ]
    tips.append("or n_ctx")
    if s.kv_cache_type in ("f16", "f32", "bf16"):
        tips.append('or set kv_cache_type = "q8_0" (about half the KV cache)')
    if biggest.park:
        tips.append(f"or park_mb ({s.park_mb})")
    return ", ".join(tips)
