#!/bin/sh
# The worked example of README "Your own data": a user's own target, 300 trivia questions with
# answers in a JSONL file (here drawn, seed 0, from the offline TriviaQA validation fold), run through
# the whole pipeline with SS_MC on the offline default model, at counts a loaded 2-core CPU finishes.
# Re-running the same command continues an interrupted run.
set -e
cd "$(dirname "$0")/../.."
PY=${PY:-python}
$PY -c '
import random, data
ex = data.load_examples("triviaqa", "validation")
pick = sorted(random.Random(0).sample(range(len(ex)), 300))
data.write_jsonl("results/custom_example/trivia300.jsonl",
                 [{"question": ex[i].text, "answer": ex[i].answer, "id": ex[i].id} for i in pick])'
$PY pipeline.py --data results/custom_example/trivia300.jsonl --field question --answer-field answer \
  --method mc --preset cpu --train-steps 60 --n-generate 160 --n-keep 80 --n-clusters 16 \
  --answer-format fewshot --answer-tokens 48 --ft-steps 6 --buckets 8 --out runs/custom_example
