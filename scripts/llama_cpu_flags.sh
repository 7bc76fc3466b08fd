#!/usr/bin/env bash
# Print the CMake CPU flags for llama.cpp on this machine: AVX2 always, AVX-512 (and its VNNI,
# VBMI and BF16 extensions) and AVX-VNNI where /proc/cpuinfo lists them, and never AMX: a build
# with AMX segfaults in ggml_backend_amx_mul_mat on the first multi-token decode (llama.cpp
# #20824), which is why the build does not simply use -march=native.
#
# Why AVX-512 matters: without it the attention over a long history runs at the f16 speed of
# AVX2.  Measured on the 2-core Xeon of CI with the embedded model (31 new tokens after 6,132
# cached): 412 ms with AVX2 only, 297 ms with AVX-512; 29 after 216: 111 against 98 ms.
#
# Both build scripts use these flags, so the bot and the llama-server it is measured against
# are built alike.  LLAMA_CMAKE_ARGS, when set, replaces them.  LOCALBOT_CPUINFO names another
# cpuinfo file (the tests).
set -euo pipefail

if [ -n "${LLAMA_CMAKE_ARGS:-}" ]; then
  echo "$LLAMA_CMAKE_ARGS"
  exit 0
fi
flags="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
have=" $(grep -m1 '^flags' "${LOCALBOT_CPUINFO:-/proc/cpuinfo}" 2>/dev/null | cut -d: -f2 || true) "
has() { for f in "$@"; do [[ "$have" == *" $f "* ]] || return 1; done; }
if has avx512f avx512cd avx512vl avx512dq avx512bw; then  # what GGML_AVX512 compiles for
  flags="$flags -DGGML_AVX512=ON"
  has avx512vbmi && flags="$flags -DGGML_AVX512_VBMI=ON"
  has avx512_vnni && flags="$flags -DGGML_AVX512_VNNI=ON"
  has avx512_bf16 && flags="$flags -DGGML_AVX512_BF16=ON"
fi
has avx_vnni && flags="$flags -DGGML_AVX_VNNI=ON"
echo "$flags"  # the AMX options are off unless asked for, with GGML_NATIVE off
