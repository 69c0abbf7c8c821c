"""Does a decode step written FOR torch.compile pay? (docs/performance.md; run from the repo root)

    python docs/perf/compile_step.py 64 16 > docs/perf/compile_step.txt
    python docs/perf/compile_step.py 1 >> docs/perf/compile_step.txt
    python docs/perf/compile_step.py --dynamic 64 16 >> docs/perf/compile_step.txt
    python docs/perf/compile_step.py --profile 64 >> docs/perf/compile_step.txt

compile.py compiled the model's own hidden_states and got nothing: dynamo breaks the graph at the
mask logic and recompiles per layer. This is the step a compiler wants, for a Llama-family model
without padding: the KV cache as one tensor per layer at a fixed length (the new key/value written
with index_copy_ at a slot given as a tensor, no Python ints that specialize), an additive mask over
all slots, the layers unrolled, attention at T = 1 as two small batched matmuls (the rep query heads
of a kv head are the rows of one), and inductor's freezing, which prepacks the weights for MKL's
packed GEMM itself. Shapes are static (one compile per batch size) unless --dynamic; --profile
adds torch.profiler's per-op table of one compiled run.

Measured against the project's `sampling.sample` on the bench's decode workload (32-token embedded
prompt, 48 new tokens, fp32, temperature 1); both prefill eagerly, so the difference is the steps.
"""
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo root
import sampling  # noqa: E402
import weights  # noqa: E402

warnings.filterwarnings("ignore")
torch._inductor.config.freezing = True       # weights become constants: inductor prepacks them
torch.set_grad_enabled(False)
m = weights.load_model(weights.DEFAULT_MODEL, dtype=torch.float32)
cfg = m.cfg
T0, N = 32, 48
S = T0 + N
rep = cfg.n_head // cfg.n_kv_head
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")


def rms(norm, x):
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))


def step(tok, ks, vs, slot, bias):
    """tok [B] -> next logits [B, V]; writes slot `slot` (0-dim tensor) of every layer's cache.
    bias [B, S]: 0 where a slot holds a token (this one included), -inf elsewhere."""
    B, hd = tok.shape[0], cfg.head_dim
    x = m.tok_emb(tok)[:, None]                                         # [B, 1, d]
    cos, sin = m._rope(slot.view(1, 1).expand(B, 1), m.inv_freq, x.dtype)
    for blk, k_cache, v_cache in zip(m.blocks, ks, vs):
        a, mlp = blk.attn, blk.mlp
        h = rms(blk.norm1, x)
        q = F.linear(h, a.q.weight).view(B, 1, cfg.n_head, hd).transpose(1, 2)
        k = F.linear(h, a.k.weight).view(B, 1, cfg.n_kv_head, hd).transpose(1, 2)
        v = F.linear(h, a.v.weight).view(B, 1, cfg.n_kv_head, hd).transpose(1, 2)
        q = q * cos + q.roll(hd // 2, -1) * sin                        # model._rope negates sin[:hd/2]
        k = k * cos + k.roll(hd // 2, -1) * sin
        k_cache.index_copy_(2, slot.view(1), k)
        v_cache.index_copy_(2, slot.view(1), v)
        scores = q.reshape(B, cfg.n_kv_head, rep, hd) @ k_cache.transpose(-1, -2) * a.scale + bias[:, None, None]
        y = (scores.softmax(-1) @ v_cache).reshape(B, 1, -1)
        x = x + F.linear(y, a.o.weight)
        h = rms(blk.norm2, x)
        x = x + F.linear(F.silu(F.linear(h, mlp.gate.weight)) * F.linear(h, mlp.up.weight), mlp.down.weight)
    return F.linear(rms(m.norm_f, x)[:, 0], m.tok_emb.weight)


flags = {a for a in sys.argv[1:] if a.startswith("--")}
compiled = torch.compile(step, dynamic="--dynamic" in flags)


def run_compiled(prefix, seed=0):
    B = prefix.shape[0]
    cache = m.new_cache(B, S)
    logits = m.logits(m.hidden_states(prefix, None, cache)[:, -1])
    ks, vs = [k.clone() for k in cache.k], [v.clone() for v in cache.v]   # one tensor per layer
    bias = torch.full((B, S), float("-inf"))
    bias[:, :T0] = 0
    g, out = torch.Generator().manual_seed(seed), []
    for n in range(N):
        tok = sampling.draw(logits.softmax(-1), g)
        out.append(tok)
        if n + 1 < N:
            bias[:, T0 + n] = 0
            logits = compiled(tok, ks, vs, torch.tensor(T0 + n), bias)
    return torch.stack(out, 1)


def run_eager(prefix, seed=0):
    return sampling.sample(m, prefix, N, temperature=1.0, eos_id=None, generator=torch.Generator().manual_seed(seed))


print(f"shapes {'dynamic' if '--dynamic' in flags else 'static'}")
for B in [int(a) for a in sys.argv[1:] if not a.startswith("--")] or [64]:
    prefix = m.embed(torch.randint(0, cfg.vocab_size, (B, T0), generator=torch.Generator().manual_seed(0)))
    t = time.perf_counter()
    got = run_compiled(prefix)
    print(f"batch {B}: first compiled run {time.perf_counter() - t:.1f} s (compiling for this batch size)")
    same = (got == torch.tensor(run_eager(prefix))).float().mean().item()
    print(f"  tokens equal to eager's, same seed: {same:.2f} (a different summation order changes a few draws, "
          f"and every later token of that row)")
    for _ in range(3):
        t = time.perf_counter(); run_eager(prefix); e = B * N / (time.perf_counter() - t)
        t = time.perf_counter(); run_compiled(prefix); c = B * N / (time.perf_counter() - t)
        print(f"  eager {e:.1f} tok/s, compiled step {c:.1f} tok/s: x{c / e:.2f}", flush=True)
    if "--profile" in flags:
        from torch.profiler import profile
        with profile() as prof:
            run_compiled(prefix)
        print(f"  one compiled run ({N - 1} compiled steps after an eager prefill), per-op self CPU time:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
