#!/usr/bin/env bash
# The engine's own overhead (docs/performance.md, "Vanilla path vs plain transformers"): vanilla applied
# through finepruner.apply against the same model with nothing applied, on the CPU `medium` shape at
# batch 1, one thread, in the same 15 interleaved rounds (after one warm-up), 16 decode steps per run.
# About 5 minutes on one lightly loaded core. Variables: OUT (default benchmarks/results), ROUNDS (15).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
.venv/bin/python -m finepruner bench --model medium --methods vanilla --batch 1 \
  --rounds "${ROUNDS:-15}" --warmup 1 --decode-steps 16 --threads 1 \
  --json "$OUT/cpu_medium_vanilla_vs_plain.json" --markdown "$OUT/cpu_medium_vanilla_vs_plain.md"
