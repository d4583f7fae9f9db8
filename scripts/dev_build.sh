#!/usr/bin/env bash
# Developer build: (re)install mha_ext into the active virtual environment as an editable
# package. Serialised with a lock so parallel shells never build at once.
set -euo pipefail
cd "$(dirname "$0")/.."
exec 9>/tmp/mha_ext_dev_build.lock
flock 9
python -m pip install --no-build-isolation -q -e . \
  -Cbuild-dir=build/dev -Ccmake.define.MHA_EXT_CUDA="${MHA_EXT_CUDA:-OFF}" "$@"
