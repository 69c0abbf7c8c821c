"""Micro-benchmarks behind the docs/performance.md (run from the repo root):

    python docs/perf/micro.py > docs/perf/micro.txt

1. Matmul GFLOP/s at the default model's shapes: F.linear against the packed GEMM on a weight packed
   once (what model.fused_linear does for frozen weights: MKL's in fp32, oneDNN's in bf16), 1-512 rows.
2. Sampling one token per row over the 49,152-entry vocabulary: torch.multinomial against inverting
   the CDF (sampling.draw), and the top-p filter by full sort against sampling.filter_logits, on the
   default model's real next-token logits (every position of 16 GSM8K questions; the nucleus size
   decides filter_logits' cost) and on flat random logits (its worst case: the top-k must grow).
3. Memory read bandwidth (sum over 512 MB): the floor of batch-1 decode, which reads every weight.
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo root
import data  # noqa: E402
from weights import DEFAULT_MODEL, load_model, load_tokenizer  # noqa: E402
from sampling import draw, filter_logits, left_pad  # noqa: E402


def per_call(f, seconds=0.5):
    f(), f()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        f()
        n += 1
    return (time.perf_counter() - t0) / n


def full_sort_top_p(logits, top_p):
    sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
    p = sorted_logits.softmax(-1)
    drop = p.cumsum(-1) - p >= top_p
    return logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))


torch.manual_seed(0)
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
packs = {  # dtype -> (name, pack(w), packed product(x, packed, w))
    torch.float32: ("MKL", lambda w: torch.ops.mkl._mkl_reorder_linear_weight(w, 64),
                    lambda x, p, w: torch.ops.mkl._mkl_linear(x, p, w, None, x.shape[0])),
    torch.bfloat16: ("oneDNN", lambda w: torch.ops.mkldnn._reorder_linear_weight(w, 16),
                     lambda x, p, w: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [None], "")),
}
for dtype, (lib, pack, packed_linear) in packs.items():
    print(f"\n1. {str(dtype)[6:]} GFLOP/s, F.linear vs {lib} packed weight (N x K = out x in)")
    for name, (N, K) in {"q|k|v": (960, 576), "o": (576, 576), "gate|up": (3072, 576), "down": (576, 1536),
                         "LM head": (49152, 576)}.items():
        w = torch.randn(N, K).to(dtype)
        packed = pack(w)
        for M in (1, 4, 16, 64, 128, 512):
            x = torch.randn(M, K).to(dtype)
            a = per_call(lambda: F.linear(x, w))
            b = per_call(lambda: packed_linear(x, packed, w))
            gf = 2 * M * N * K / 1e9
            print(f"  {name:8s} {N:5d}x{K:<4d} rows {M:3d}: F.linear {gf / a:6.1f}  packed {gf / b:6.1f}  x{a / b:.2f}")

model, tok = load_model(DEFAULT_MODEL, dtype=torch.float32), load_tokenizer(DEFAULT_MODEL)
ids, mask = left_pad([tok.encode(e.text) for e in data.load_examples("gsm8k", split="test", limit=16)])
with torch.no_grad():
    real = model(model.embed(ids), attention_mask=mask)[mask.bool()].float()     # [positions, V]
real = real[torch.randperm(len(real), generator=torch.Generator().manual_seed(0))]
nucleus = (~torch.isinf(filter_logits(real, top_p=0.9))).sum(-1).float()
print(f"\n2. sampling over {real.shape[1]:,} logits, ms per step; real logits: {len(real)} positions, nucleus at "
      f"top-p 0.9: median {nucleus.median():.0f}, 90th percentile {nucleus.quantile(0.9):.0f}, max {nucleus.max():.0f} tokens")
for kind in ("real", "flat (randn)"):
    for B in (1, 16, 64):
        logits = real[:B] if kind == "real" else torch.randn(B, real.shape[1])
        probs, g = logits.softmax(-1), torch.Generator().manual_seed(0)
        t = [per_call(f) * 1e3 for f in (lambda: torch.multinomial(probs, 1, generator=g), lambda: draw(probs, g),
                                          lambda: full_sort_top_p(logits, 0.9), lambda: filter_logits(logits, top_p=0.9))]
        print(f"  {kind:12s} batch {B:2d}: multinomial {t[0]:7.2f}  draw {t[1]:6.2f}   top-p 0.9 by full sort {t[2]:7.2f}"
              f"  filter_logits {t[3]:6.2f}")

x = torch.randn(128 * 2**20)
best = min(per_call(lambda: x.sum(), 1.0) for _ in range(3))
print(f"\n3. memory read: {x.numel() * 4 / best / 1e9:.1f} GB/s (sum over {x.numel() * 4 / 2**20:.0f} MB)")
