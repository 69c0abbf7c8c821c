"""Does torch.compile pay for decode here? (docs/performance.md; run from the repo root)

    python docs/perf/compile.py 64 > docs/perf/compile.txt        # batch 64, packing off
    python docs/perf/compile.py 64 pack                               # packing on: fails to compile

The bench's decode workload (32-token embedded prompt, 48 new tokens) in fp32, eager, then with
the decode steps' `hidden_states` under torch.compile(dynamic=True). MKL weight packing is off by
default here: inductor cannot trace the packed op with dynamic shapes, so this compares the
compiler against plain F.linear, the thing it would replace.
"""
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo root
import model as M  # noqa: E402
import sampling  # noqa: E402
import weights  # noqa: E402

warnings.filterwarnings("ignore")
M._MKL_PACK = len(sys.argv) > 2
B = int(sys.argv[1])
print(f"batch {B}, MKL packing {'on' if M._MKL_PACK else 'off'}, torch {torch.__version__}, "
      f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
m = weights.load_model(weights.DEFAULT_MODEL, dtype=torch.float32)
prefix = m.embed(torch.randint(0, m.cfg.vocab_size, (B, 32), generator=torch.Generator().manual_seed(0)))
run = lambda: sampling.sample(m, prefix, 48, temperature=1.0, eos_id=None, generator=torch.Generator().manual_seed(0))
run()
for _ in range(2):
    t = time.perf_counter(); run(); print(f"eager: {B * 48 / (time.perf_counter() - t):.1f} tok/s", flush=True)
eager, compiled = m.hidden_states, torch.compile(m.hidden_states, dynamic=True)


def hidden_states(embeds, attention_mask=None, cache=None, segment_ids=None):
    step = cache is not None and embeds.shape[1] == 1           # decode steps compiled, prefill eager
    return (compiled if step else eager)(embeds, attention_mask, cache, segment_ids)


m.hidden_states = hidden_states
t = time.perf_counter(); run(); print(f"first compiled run (compiling): {time.perf_counter() - t:.1f} s", flush=True)
for _ in range(2):
    t = time.perf_counter(); run(); print(f"compiled: {B * 48 / (time.perf_counter() - t):.1f} tok/s", flush=True)
