#!/usr/bin/env bash
# Steps 2-3 of the cpu-preset GSM8K SS_MC pipeline (1,000 SoftSRV questions, 500 kept and answered
# in at most 256 tokens) in one process and under `torchrun --nproc_per_node=2`, from the same
# trained θ (runs/gsm8k-mc/softsrv and its settings, so step 1 finds the training done): each step's
# wall time (state.json) and whether the files are identical. Run from the repo root after
# `python pipeline.py --task gsm8k --method mc --dtype fp32`; it resumes if interrupted:
#     bash docs/perf/torchrun_pipeline.sh > docs/perf/torchrun_pipeline.txt
set -e
P=${PYTHON:-.venv/bin/python}
T=runs/torchrun-check
ARGS="--task gsm8k --method mc --dtype fp32 --stop-after answer"
echo "torch $($P -c 'import torch; print(torch.__version__)'), $(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg)"
for mode in one two; do
  mkdir -p $T/$mode
  [ -d $T/$mode/softsrv ] || cp -r runs/gsm8k-mc/softsrv $T/$mode/
  [ -f $T/$mode/settings.json ] || cp runs/gsm8k-mc/settings.json $T/$mode/
  if [ $mode = one ]; then
    $P pipeline.py $ARGS --out $T/$mode > $T/$mode.log 2>&1
  else
    $P -m torch.distributed.run --standalone --nproc_per_node=2 pipeline.py $ARGS --out $T/$mode > $T/$mode.log 2>&1
  fi
  $P -c "import json; s = json.load(open('$T/$mode/state.json'))
print('$mode', {'one': 'one process, $(nproc) threads', 'two': 'torchrun, 2 processes x 1 thread'}['$mode'] + ':',
      ', '.join(f'{k} {v[\"seconds\"]:.0f} s' for k, v in s.items()))"
done
for f in questions.jsonl answers.jsonl; do
  cmp -s $T/one/$f $T/two/$f && echo "$f identical: True" || echo "$f identical: False"
done
