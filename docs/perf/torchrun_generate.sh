#!/usr/bin/env bash
# One process with both threads against torchrun's two single-thread processes, generating the same
# 128 SoftSRV samples (the pipeline's sampling settings) twice each; the files must be identical.
# Run from the repo root after `python pipeline.py --task gsm8k --method mc` has trained runs/gsm8k-mc:
#     bash docs/perf/torchrun_generate.sh > docs/perf/torchrun_generate.txt
set -e
P=${PYTHON:-.venv/bin/python}
T=$(mktemp -d)
A="--ckpt runs/gsm8k-mc/softsrv --num-samples 128 --top-p 0.9 --dtype fp32"
echo "torch $($P -c 'import torch; print(torch.__version__)'), $(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg)"
for i in 1 2; do
  s=$(date +%s.%N); $P generate.py $A --out $T/one.jsonl >/dev/null 2>&1; e=$(date +%s.%N)
  echo "one process, $(nproc) threads: $(echo "$e - $s" | bc) s wall (model loading included)"
  s=$(date +%s.%N); $P -m torch.distributed.run --standalone --nproc_per_node=2 generate.py $A --out $T/two.jsonl >/dev/null 2>&1; e=$(date +%s.%N)
  echo "torchrun, 2 processes x 1 thread: $(echo "$e - $s" | bc) s wall"
  cmp -s $T/one.jsonl $T/two.jsonl && echo "same file: True" || echo "same file: False"
  rm -f $T/one.jsonl $T/two.jsonl
done
rm -rf $T
