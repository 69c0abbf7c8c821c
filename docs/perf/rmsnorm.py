"""Does fusing RMSNorm (F.rms_norm, one op instead of seven) speed up decode? (docs/performance.md)

    python docs/perf/rmsnorm.py > docs/perf/rmsnorm.txt      # from the repo root

The project's sample() at batch 1 and 16, fp32, 32-token prompt, 48 new tokens, alternating the
model's RMSNorm and F.rms_norm four times each; tok/s sorted. Not adopted: no gain.
"""
import os, sys, time, torch, torch.nn.functional as F
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo root
import model as M, sampling, weights
torch.set_grad_enabled(False)
m = weights.load_model(weights.DEFAULT_MODEL, dtype=torch.float32)
orig = M.RMSNorm.forward
def fused(self, x):
    if self.unit_offset or x.dtype != torch.float32:
        return orig(self, x)
    return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
x = torch.randn(3, 5, 576) * 3
n = m.blocks[0].norm1
print("largest difference of the outputs:", (orig(n, x) - fused(n, x)).abs().max().item())
for B in (1, 16):
    prefix = m.embed(torch.randint(0, 49152, (B, 32), generator=torch.Generator().manual_seed(0)))
    run = lambda: sampling.sample(m, prefix, 48, eos_id=None, generator=torch.Generator().manual_seed(0))
    run()
    res = {"orig": [], "fused": []}
    for r in range(4):
        for k, f in (("orig", orig), ("fused", fused)):
            M.RMSNorm.forward = f
            t = time.perf_counter(); run(); res[k].append(B * 48 / (time.perf_counter() - t))
    print(f"batch {B}: " + "; ".join(f"{k} " + " ".join(f"{x:.1f}" for x in sorted(v)) for k, v in res.items()) + " tok/s")
