"""The bf16 packed GEMM in model.fused_linear (oneDNN), measured three ways (run from the repo root):

    python docs/perf/pack_bf16.py > docs/perf/pack_bf16.txt

1. One row against many distinct weights (40 per shape, so they do not sit in cache as in micro.py's
   section 1): GB/s of weights read by F.linear, the oneDNN-packed product and a plain sum over the
   same weights (what memory allows), in bf16; and in fp32 the time of F.linear, oneDNN's and MKL's
   packed products at 1-16 rows (why fp32 keeps MKL's).
2. sampling.sample on the default model in bf16 (the bench's decode workload: 32-token embedded
   prompt, 48 new tokens, no EOS), packing off vs on, alternating, same generator seed: tok/s and
   whether the tokens are identical.
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo root
import model as M  # noqa: E402
import sampling  # noqa: E402
import weights  # noqa: E402


def per_call(f, n=20):
    f()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t0) / n


def onednn(x, packed):
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [None], "")


torch.manual_seed(0)
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
print("\n1a. bf16, 1 row, 40 distinct weights per shape: GB/s of weights read")
for N, K in ((960, 576), (3072, 576), (576, 1536)):
    ws = [torch.randn(N, K).bfloat16() for _ in range(40)]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in ws]
    x = torch.randn(1, K).bfloat16()
    gb = sum(w.numel() * 2 for w in ws) / 1e9
    t = {"F.linear": per_call(lambda: [F.linear(x, w) for w in ws]),
         "oneDNN packed": per_call(lambda: [onednn(x, p) for p in packed]),
         "sum (read only)": per_call(lambda: [w.sum() for w in ws])}
    print(f"  {N:5d}x{K:<4d} " + "  ".join(f"{k} {gb / v:5.1f}" for k, v in t.items()))

print("\n1b. fp32, 40 distinct weights per shape: ms for all 40 products")
for N, K in ((3072, 576), (576, 1536)):
    ws = [torch.randn(N, K) for _ in range(40)]
    mkl = [torch.ops.mkl._mkl_reorder_linear_weight(w, 64) for w in ws]
    dnn = [torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in ws]
    for rows in (1, 4, 16):
        x = torch.randn(rows, K)
        t = {"F.linear": per_call(lambda: [F.linear(x, w) for w in ws]),
             "oneDNN packed": per_call(lambda: [onednn(x, p) for p in dnn]),
             "MKL packed": per_call(lambda: [torch.ops.mkl._mkl_linear(x, p, w, None, rows) for p, w in zip(mkl, ws)])}
        print(f"  {N:5d}x{K:<4d} rows {rows:2d}: " + "  ".join(f"{k} {v * 1e3:6.2f}" for k, v in t.items()))

print("\n2. sampling.sample, bf16, 32-token embedded prompt, 48 new tokens: tok/s, packing off -> on")
model = weights.load_model(weights.DEFAULT_MODEL, dtype=torch.bfloat16).eval()
available = M._ONEDNN_PACK_BF16
for B in (1, 16, 64):
    prompt = (torch.randn(B, 32, model.cfg.d_model, generator=torch.Generator().manual_seed(B)) * 0.02).bfloat16()
    got = {False: [], True: []}
    tokens = {}
    for _ in range(3):
        for on in (False, True):
            M._ONEDNN_PACK_BF16 = on and available
            t0 = time.perf_counter()
            tokens[on] = sampling.sample(model, prompt, 48, generator=torch.Generator().manual_seed(0))
            got[on].append(B * 48 / (time.perf_counter() - t0))
    M._ONEDNN_PACK_BF16 = available
    print(f"  batch {B:2d}: off " + " ".join(f"{v:6.1f}" for v in got[False]) + "   on " +
          " ".join(f"{v:6.1f}" for v in got[True]) + f"   same tokens: {tokens[False] == tokens[True]}")
