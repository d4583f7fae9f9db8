#!/usr/bin/env bash
# Deterministic A/B of two mha_bench binaries for a noisy or shared machine: the instructions
# executed inside mha::attention_forward (valgrind --tool=callgrind, Ir collected only within
# that function: check_params and the kernel, not the harness's random fill) on a few small
# forward configurations, one thread, the same calls on both sides (1 warm-up + 3 timed calls,
# no validation), on the default path and on MHA_EXT_SIMD=generic. Not a wall-clock time.
# Usage: benchmarks/native/ab_instructions.sh OLD_MHA_BENCH NEW_MHA_BENCH
set -euo pipefail
old=$1 new=$2
configs=(
  "--shape 1,2,2,256,256,64 --variant none"
  "--shape 1,2,2,256,256,64 --variant causal"
  "--shape 1,2,2,256,256,128 --variant mask"
  "--shape 1,2,2,256,256,64 --variant key_lengths"
  "--shape 1,4,4,1,4096,128 --variant decode"
  "--shape 1,2,2,128,128,64 --variant none --dtype float64"
)
ir() {
  # shellcheck disable=SC2086
  valgrind --tool=callgrind --callgrind-out-file=/dev/null '--toggle-collect=mha::attention_forward(*' "$@" --threads 1 --iters 3 \
    --warmup 1 --min-time 0 --no-validate 2>&1 >/dev/null | awk '/Collected :/ {print $4}'
}
for simd in "" generic; do
  for cfg in "${configs[@]}"; do
    # shellcheck disable=SC2086
    o=$(MHA_EXT_SIMD=$simd ir "$old" $cfg)
    # shellcheck disable=SC2086
    n=$(MHA_EXT_SIMD=$simd ir "$new" $cfg)
    printf '%-8s %-50s old %14s new %14s new/old %s\n' "${simd:-default}" "$cfg" "$o" "$n" \
      "$(python3 -c "print(f'{$n / $o:.4f}')")"
  done
done
