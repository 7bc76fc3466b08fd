"""libgomp's waiting policy is set before llama.cpp's libraries load (ai_model/__init__.py)."""

from __future__ import annotations

import os
import subprocess
import sys

CHECK = (
    "import os, sys, ai_model.batched; "
    "assert 'llama_cpp' not in sys.modules; "
    "print(os.environ['OMP_WAIT_POLICY'], os.environ['GOMP_SPINCOUNT'])"
)


def run(env: dict[str, str]) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    done = subprocess.run(
        [sys.executable, "-c", CHECK], env={**clean, **env}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_openmp_threads_keep_spinning_at_barriers_unless_the_user_says_otherwise() -> None:
    assert run({}) == "ACTIVE 300000"  # set before llama_cpp is imported
    assert run({"OMP_WAIT_POLICY": "PASSIVE"}) == "PASSIVE 300000"
