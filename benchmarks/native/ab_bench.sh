#!/usr/bin/env bash
# A/B of two mha_bench binaries (e.g. before/after a refactor) on a few forward configurations:
# same shell, one thread, the two binaries alternated ROUNDS times per configuration; prints
# each run's median ms and, per configuration, the median over rounds and the ratio new/old.
# Usage: benchmarks/native/ab_bench.sh OLD_MHA_BENCH NEW_MHA_BENCH [ROUNDS]
set -euo pipefail
old=$1 new=$2 rounds=${3:-5}
configs=(
  "--shape 1,8,8,1024,1024,64 --variant none"
  "--shape 1,8,8,1024,1024,64 --variant causal"
  "--shape 1,8,8,512,512,128 --variant mask"
  "--shape 1,8,8,1024,1024,64 --variant key_lengths"
  "--shape 1,8,8,1,32768,128 --variant decode"
  "--shape 1,4,4,512,512,64 --variant none --dtype float64"
)
for cfg in "${configs[@]}"; do
  o=() n=()
  for ((r = 0; r < rounds; r++)); do
    # shellcheck disable=SC2086
    for side in old new; do
      bin=$old; [[ $side == new ]] && bin=$new
      ms=$("$bin" $cfg --threads 1 --iters 5 --warmup 1 --min-time 0.05 --no-validate |
           awk '$1 == "custom" {print $10}')
      if [[ $side == old ]]; then o+=("$ms"); else n+=("$ms"); fi
    done
  done
  python3 - "$cfg" "${o[*]}" "${n[*]}" <<'PY'
import statistics, sys
cfg, o, n = sys.argv[1], [float(x) for x in sys.argv[2].split()], [float(x) for x in sys.argv[3].split()]
mo, mn = statistics.median(o), statistics.median(n)
print(f"{cfg:48s} old {mo:9.3f} ms  new {mn:9.3f} ms  new/old {mn / mo:.3f}   (old {o}, new {n})")
PY
done
