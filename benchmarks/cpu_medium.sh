#!/usr/bin/env bash
# CPU figures of docs/performance.md: the `medium` shape (576 visual tokens, 8-layer 1024-wide decoder,
# random weights, fp32, one thread: see docs/performance.md for why), every method at 64/128/192 tokens,
# plus FinePruner's dynamic head selector and FastV with eager scoring; batch 1, 7 interleaved rounds
# after one warm-up (plain transformers and vanilla always run too: the engine's overhead is printed under
# the table). About 6-10 minutes on one lightly loaded core.
# Variables: OUT (default benchmarks/results), BATCH (1), ROUNDS (7), THREADS (1).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
.venv/bin/python -m finepruner bench --model medium --budgets 64 128 192 --batch "${BATCH:-1}" \
  --methods cdpruner fastv finepruner finepruner:strategy=dynamic pdrop random sparsevlm vispruner \
            fastv:score_impl=eager \
  --rounds "${ROUNDS:-7}" --warmup 1 --decode-steps 6 --threads "${THREADS:-1}" \
  --json "$OUT/cpu_medium_b${BATCH:-1}.json" --markdown "$OUT/cpu_medium_b${BATCH:-1}.md" \
  --plot "$OUT/cpu_medium_b${BATCH:-1}.png"
