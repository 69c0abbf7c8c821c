#!/bin/bash
# Sampling sweep for the cpu preset (issue 9): 330 SS_MC samples per setting from the pipeline's
# trained checkpoint, then MAUVE (32 buckets and 10, k-means seeds 1-5) against non-test data.
set -e
cd "$(dirname "$0")/../.."  # the repo root
CK=/work/main/runs/gsm8k-mc/softsrv
S=/work/main/runs/sweep
until grep -q '"train"' /work/main/runs/gsm8k-mc/state.json 2>/dev/null; do sleep 20; done
for tp in "1.0 1.0" "1.0 0.9" "1.0 0.8" "0.8 1.0" "0.8 0.9"; do
  set -- $tp
  OMP_NUM_THREADS=1 .venv/bin/python generate.py --ckpt $CK --n 330 --temperature $1 --top-p $2 \
      --out $S/samples_t$1_p$2.jsonl
done
