"""The sampler before and after issue 25, side by side in one process (run from the repo root):

    python docs/perf/sampler_sides.py --dtype bf16 > docs/perf/sampler_sides.txt

bench.py's `answer` and `fewshot` workloads without transformers' side: each side decodes the same
prompts twice, alternately (before, [continuous,] after, before, ...), and prints the generated
tokens and tokens per second of every run. "before" is the sampler until issue 25 (sorted batches,
each decoded until its last row ends: bench.batch_at_a_time), "continuous" continuous batching on the
whole prompts, "after" continuous batching with the k-shot exemplars prefilled once (fewshot).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo root

import bench  # noqa: E402
from weights import DEFAULT_MODEL, load_model, load_tokenizer  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="weights' precision (default bf16)")
p.add_argument("--answer-prompts", type=int, default=48, help="answer workload prompts (default 48)")
p.add_argument("--fewshot-items", type=int, default=16, help="fewshot workload items (default 16)")
args = p.parse_args()
dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
model, tok = load_model(DEFAULT_MODEL, dtype=dtype), load_tokenizer(DEFAULT_MODEL)
cfg = bench.BenchConfig(answer_prompts=args.answer_prompts, fewshot_items=args.fewshot_items, model=DEFAULT_MODEL)
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}")
for workload, make in (("answer", bench.answer_sides), ("fewshot", bench.fewshot_sides)):
    sides = {k: fn for k, fn in make(model, None, tok, cfg).items() if k != "hf"}
    for name in list(sides) * 2:
        t = time.perf_counter()
        out = sides[name]()
        s = time.perf_counter() - t
        n = sum(map(len, out))
        print(f"{workload:8s} {name:11s} {n:6d} tokens {s:7.2f} s {n / s:7.1f} tok/s", flush=True)
