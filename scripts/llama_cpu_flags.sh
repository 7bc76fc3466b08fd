#!/usr/bin/env bash
# Print the CMake CPU flags for llama.cpp on this machine: AVX2, FMA and F16C, and never AMX: a
# build with AMX segfaults in ggml_backend_amx_mul_mat on the first multi-token decode (llama.cpp
# #20824), which is why the build does not simply use -march=native.
#
# AVX-512 and its extensions are added where /proc/cpuinfo lists them (LOCALBOT_LLAMA_AVX512=0
# leaves them out): the attention over a long history is much faster with them.  Measured on the
# 2-core Xeon of CI, embedded model: 31 new tokens after 6,132 cached took 412 ms with AVX2 and
# 302 ms with AVX-512 (README, Speed).  (With either build, stock llama.cpp's logits depend on
# how a step groups a sequence's tokens; scripts/patches/llama.cpp/ fixes that.)
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
if [ "${LOCALBOT_LLAMA_AVX512:-1}" != "0" ]; then
  have=" $(grep -m1 '^flags' "${LOCALBOT_CPUINFO:-/proc/cpuinfo}" 2>/dev/null | cut -d: -f2 || true) "
  has() { for f in "$@"; do [[ "$have" == *" $f "* ]] || return 1; done; }
  if has avx512f avx512cd avx512vl avx512dq avx512bw; then  # what GGML_AVX512 compiles for
    flags="$flags -DGGML_AVX512=ON"
    has avx512vbmi && flags="$flags -DGGML_AVX512_VBMI=ON"
    has avx512_vnni && flags="$flags -DGGML_AVX512_VNNI=ON"
    has avx512_bf16 && flags="$flags -DGGML_AVX512_BF16=ON"
  fi
  has avx_vnni && flags="$flags -DGGML_AVX_VNNI=ON"
fi
echo "$flags"  # the AMX options are off unless asked for, with GGML_NATIVE off
