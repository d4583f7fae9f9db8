#!/usr/bin/env bash
# The CUDA backend without a GPU: build mha_ext with MHA_EXT_CUDA_EMULATOR=ON (the kernel
# sources compiled for the host emulator, csrc/cuda/emu/) into a scratch directory and run
# the emulator's own tests and the CUDA test file under it, shared-memory race detector on.
# See README_cuda.md for what this verifies and what only a GPU can tell.
#
# Usage: scripts/cuda_emulation.sh [PYTHON]   (a Python with numpy, pytest, hypothesis and
#        ml_dtypes; default python3). Needs g++ (x86-64) and cmake; pip builds in isolation.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
py=${1:-${PYTHON:-python3}}
start=$SECONDS
work=$(mktemp -d "${TMPDIR:-/tmp}/mha_ext_cuda_emu.XXXXXX")
trap 'rm -rf "$work"' EXIT

printf '=== [%4ds] build (MHA_EXT_CUDA_EMULATOR=ON)\n' "$((SECONDS - start))"
"$py" -m pip install -q --no-deps --target "$work/site" . -Cbuild-dir="$work/build" \
  -Ccmake.define.MHA_EXT_CUDA=OFF -Ccmake.define.MHA_EXT_CUDA_EMULATOR=ON

printf '=== [%4ds] tests/test_cuda_emulator.py tests/test_cuda.py (emulated)\n' \
  "$((SECONDS - start))"
# The emulator modules use initial-exec TLS (fiber state, race-detector hooks); give the
# dynamic loader room for them when Python dlopens the extension.
export GLIBC_TUNABLES=glibc.rtld.optional_static_tls=67108864
unset MHA_EXT_CUDA_EMU_RACECHECK MHA_EXT_CUDA_EMU_SCHEDULE MHA_EXT_CUDA_SIMT MHA_EXT_CUDA_SPLITS
PYTHONPATH="$work/site" "$py" -c \
  'import mha_ext, sys; i = mha_ext.build_info(); print("mha_ext from", mha_ext.__file__); sys.exit(0 if i["cuda_emulated"] and mha_ext.cuda_available() else 1)'
PYTHONPATH="$work/site" "$py" -m pytest -p no:cacheprovider -q \
  "$root/tests/test_cuda_emulator.py" "$root/tests/test_cuda.py"
printf '=== [%4ds] done\n' "$((SECONDS - start))"
