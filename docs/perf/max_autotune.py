"""Would inductor's own GEMM do better than MKL's packed GEMM on weights that come from memory?
(docs/performance.md, next to docs/perf/cold_weights.py.) Run from the repo root:

    python docs/perf/max_autotune.py 2>&1 | grep -v Warning > docs/perf/max_autotune.txt

(inductor prints its autotuning table, the choices' times with the weight in cache, on stderr.)

40 distinct 3072x576 fp32 weights (283 MB, the gate|up shape) times 16 rows, as a decode step at
batch 16 meets them: MKL's packed GEMM (what model.fused_linear calls) against the same products
compiled with inductor's freezing and max-autotune over its C++ GEMM template and ATen's.
"""
import time

import torch
import torch._inductor.config as ic
import torch.nn as nn

ic.freezing = True
ic.force_disable_caches = True     # autotune afresh, so its table is printed
ic.max_autotune = True
ic.max_autotune_gemm_backends = "CPP,ATEN"
torch.manual_seed(0)
L = 40
class M(nn.Module):
    def __init__(s):
        super().__init__(); s.l = nn.ModuleList(nn.Linear(576, 3072, bias=False) for _ in range(L))
    def forward(s, x):
        return [l(x) for l in s.l]
m = M().eval()
x = torch.randn(16, 576)
P = [(torch.ops.mkl._mkl_reorder_linear_weight(l.weight.detach(), 64), l.weight.detach()) for l in m.l]
def mkl():
    return [torch.ops.mkl._mkl_linear(x, p, w, None, 16) for p, w in P]
t = time.perf_counter()
with torch.no_grad():
    c = torch.compile(m)
    c(x)
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; compile {time.perf_counter() - t:.0f} s")
def tm(f, reps=10):
    with torch.no_grad():
        f(); t = time.perf_counter()
        for _ in range(reps): f()
    return (time.perf_counter() - t) / reps * 1e3
for _ in range(2):
    print(f"mkl packed {tm(mkl):.2f} ms   compiled max-autotune {tm(lambda: c(x)):.2f} ms  (40 x 3072x576 fp32 at 16 rows, 283 MB)")
with torch.no_grad():
    print("max diff", max((a - b).abs().max().item() for a, b in zip(c(x), mkl())))
