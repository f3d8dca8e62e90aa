#!/usr/bin/env bash
# The CPU figures the README quotes, each into the result file the README names. Run on an idle
# machine (the README's figures: the 2-core development machine); about 10 minutes.
#   bash bench/cpu_figures.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
R=bench/results
run() { echo "== $*"; "$PY" "$@"; }
run bench/bench_rope3d.py --json "$R/rope_cpu_float32.json"
run bench/bench_rope3d.py --dtype bfloat16 --json "$R/rope_cpu_bfloat16.json"
run bench/bench_attention.py --device cpu --threads 1 --json "$R/attention_cpu.json"
run bench/bench_attention.py --device cpu --json "$R/attention_cpu_2threads.json"
run bench/bench_select_blocks.py --device cpu --json "$R/bench_select_cpu.json"
run bench/bench_select_blocks.py --device cpu --threads 1 --skip-attention \
  --json "$R/bench_select_cpu_1thread.json"
run bench/bench_lowrank.py --device cpu --quick --json "$R/bench_lowrank_cpu_quick.json"
run bench/bench_stream.py --preset tiny --device cpu --json "$R/bench_stream_tiny_cpu.json" \
  --plot "$R/bench_stream_tiny_cpu.png"
run bench/bench_offsets.py --json "$R/bench_offsets_cpu.json"
run bench/bench_backward.py --device cpu --threads 1 --quick --json "$R/backward_cpu.json"
