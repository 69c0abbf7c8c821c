"""What bounds the decode step's matmuls: the weights come from memory, not from cache (docs/performance.md). Run from the repo root:

    python docs/perf/cold_weights.py > docs/perf/cold_weights.txt

The default model's 30 blocks of weights (q|k|v 960x576, o 576x576, gate|up 3072x576, down 576x1536;
random values, the real shapes) packed as model.fused_linear packs them (MKL for fp32, oneDNN for
bf16), multiplied in order at 1-64 rows as a decode step does: "cold" walks all 30 blocks (425 MB in
fp32, more than any cache here), "hot" repeats block 0 30 times (14 MB, from L2/L3). Milliseconds per
pass, GFLOP/s, and GB/s of weights read. Then 1 row on 1 and 2 threads: what one core streams.
"""
import os
import time

import torch

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
L = 30


def packed(dtype):
    torch.manual_seed(0)
    ws = [[torch.randn(n, k).to(dtype) for n, k in SHAPES] for _ in range(L)]
    if dtype == torch.float32:
        return [[(torch.ops.mkl._mkl_reorder_linear_weight(w, 64), w) for w in blk] for blk in ws]
    return [[(torch.ops.mkldnn._reorder_linear_weight(w, 16), w) for w in blk] for blk in ws]


def one_pass(blocks, xs, dtype, rows):
    for blk in blocks:
        for x, (p, w) in zip(xs, blk):
            if dtype == torch.float32:
                torch.ops.mkl._mkl_linear(x, p, w, None, rows)
            else:
                torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [None], "")


def timed(blocks, xs, dtype, rows, reps=5):
    one_pass(blocks, xs, dtype, rows)
    t = time.perf_counter()
    for _ in range(reps):
        one_pass(blocks, xs, dtype, rows)
    return (time.perf_counter() - t) / reps


print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
params = sum(n * k for n, k in SHAPES) * L
for dtype, rows_list in ((torch.float32, (1, 4, 16, 64)), (torch.bfloat16, (1, 4, 16, 64))):
    P = packed(dtype)
    size = params * torch.finfo(dtype).bits // 8
    for rows in rows_list:
        xs = [torch.randn(rows, k).to(dtype) for _, k in SHAPES]
        line = []
        for name, blocks in (("cold", P), ("hot", [P[0]] * L)):
            s = timed(blocks, xs, dtype, rows)
            line.append(f"{name} {s * 1e3:6.2f} ms {2 * rows * params / s / 1e9:6.1f} GFLOP/s {size / s / 1e9:5.1f} GB/s")
        print(f"{str(dtype)[6:]:8s} rows {rows:2d}: " + " | ".join(line))
    xs = [torch.randn(1, k).to(dtype) for _, k in SHAPES]
    threads = torch.get_num_threads()
    for nt in (1, threads):
        torch.set_num_threads(nt)
        s = timed(P, xs, dtype, 1)
        print(f"{str(dtype)[6:]:8s} rows  1, cold, {nt} thread(s): {s * 1e3:6.2f} ms {size / s / 1e9:5.1f} GB/s")
    torch.set_num_threads(threads)
    del P
