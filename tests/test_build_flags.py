"""The CPU flags llama.cpp is built with: AVX2, AVX-512 where the CPU has it, never AMX."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "llama_cpu_flags.sh"
SAPPHIRE_RAPIDS = (
    "fpu sse2 avx f16c fma avx2 bmi2 avx512f avx512dq avx512cd avx512bw avx512vl avx512vbmi "
    "avx512_vnni avx512_bf16 avx_vnni amx_bf16 amx_tile amx_int8"
)


def flags(tmp_path: Path, cpuinfo: str, **env: str) -> list[str]:
    info = tmp_path / "cpuinfo"
    info.write_text(cpuinfo)
    run_env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LLAMA_CMAKE_ARGS", "LOCALBOT_LLAMA_AVX512")
    }
    result = subprocess.run(
        ["bash", str(SCRIPT)],
        env={**run_env, "LOCALBOT_CPUINFO": str(info), **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_an_avx512_cpu_gets_its_extensions_but_never_amx(tmp_path: Path) -> None:
    got = flags(tmp_path, f"processor\t: 0\nflags\t\t: {SAPPHIRE_RAPIDS}\n")
    for name in ("AVX2", "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AVX_VNNI"):
        assert f"-DGGML_{name}=ON" in got, name
    assert "-DGGML_NATIVE=OFF" in got  # -march=native would turn AMX on (llama.cpp #20824)
    assert not [f for f in got if "AMX" in f and f.endswith("=ON")]


def test_avx512_can_be_left_out(tmp_path: Path) -> None:
    cpuinfo = f"processor\t: 0\nflags\t\t: {SAPPHIRE_RAPIDS}\n"
    got = flags(tmp_path, cpuinfo, LOCALBOT_LLAMA_AVX512="0")
    assert "-DGGML_AVX2=ON" in got and "-DGGML_NATIVE=OFF" in got
    assert not [f for f in got if "AVX512" in f or "AMX" in f]


def test_a_cpu_without_all_of_avx512s_parts_gets_avx2_only(tmp_path: Path) -> None:
    partial = SAPPHIRE_RAPIDS.replace("avx512bw ", "")  # GGML_AVX512 compiles for BW too
    got = flags(tmp_path, f"flags\t\t: {partial}\n")
    assert "-DGGML_AVX2=ON" in got
    assert not [f for f in got if "AVX512" in f]


def test_a_cpuinfo_without_flags_and_a_users_args(tmp_path: Path) -> None:
    # An ARM machine lists "Features": the base flags, and no failure.
    assert "-DGGML_NATIVE=OFF" in flags(tmp_path, "Features\t: fp asimd\n")
    assert flags(tmp_path, "", LLAMA_CMAKE_ARGS="-DGGML_CUDA=ON") == ["-DGGML_CUDA=ON"]


def test_the_installed_llama_cpp_has_the_features_the_script_picks_here() -> None:
    """The wheel in use was built with this machine's flags (a stale AVX2-only wheel, or one
    from another machine, shows here)."""
    if os.environ.get("LLAMA_CMAKE_ARGS"):
        pytest.skip("built with the user's own flags")
    import llama_cpp

    picked = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30, check=True
    ).stdout.split()
    info = llama_cpp.llama_print_system_info().decode()
    assert ("AVX512 = 1" in info) == ("-DGGML_AVX512=ON" in picked), info
    assert "AMX" not in info, info
