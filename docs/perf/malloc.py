"""What runtime.keep_freed_memory() buys (docs/performance.md; run from the repo root)

    for w in train finetune prefill decode64; do for m in default keep default keep; do
        python docs/perf/malloc.py $m $w; done; done > docs/perf/malloc.txt

One bench workload (bench.py's, fp32), ours and transformers', in a fresh process with glibc's
default malloc settings or with keep_freed_memory() applied first: tok/s (median of 3 calls after a
warm-up) and minor page faults per call.
"""
import os
import resource
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo root
import bench  # noqa: E402
from runtime import keep_freed_memory  # noqa: E402
from weights import load_model, resolve_model_dir  # noqa: E402

warnings.filterwarnings("ignore")
mode, work = sys.argv[1], sys.argv[2]
if mode == "keep" and not keep_freed_memory():
    sys.exit("keep_freed_memory() does not apply here (not Linux/glibc)")
cfg = bench.BenchConfig()
folder = resolve_model_dir(cfg.model)
if work == "finetune":
    ours, theirs, n = bench.finetune_pair(folder, torch.float32, cfg)
else:
    m, hf = load_model(folder, dtype=torch.float32), bench.load_transformers(folder, torch.float32)
    if work.startswith("decode"):
        ours, theirs, n = bench.decode_pair(m, hf, int(work.removeprefix("decode")), cfg)
    else:
        ours, theirs, n = {"train": bench.train_pair, "prefill": bench.prefill_pair}[work](m, hf, cfg)
ours(), theirs()
for side, fn in (("ours", ours), ("transformers", theirs)):
    times, f0 = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 3
    print(f"{mode:8s} {work:9s} {side:13s} {n / sorted(times)[1]:7.1f} tok/s  {faults:9,.0f} page faults per call", flush=True)
