"""Fewer small ops per decode step: what rotating q and k as one tensor and a leaner fused_linear
bought (docs/performance.md; run from the repo root):

    python docs/perf/decode_ops.py > docs/perf/decode_ops.txt

"before" is the decode path's code as it was at be88765 (Attention/MLP forward, the LM head,
Transformer._rope and fused_linear for a bias-free Llama-family model), copied below: q and k
rotated separately by HF's rotate_half (chunk, neg, cat), fused_linear reading weights through
Module.__getattr__ and returning its outputs split into a list. "after" is the current code:
one RoPE over the [B, T, H + Hkv, hd] block of queries and keys, rotate_half(x) * sin written as
x.roll(hd/2) * sin with sin's first half negated (the same products, so the same bits). Both run
sampling.sample on the default model (the bench's decode workload: 32-token embedded prompt, 48 new
tokens, no EOS), alternating, four times each, same generator seed: tok/s sorted, and whether the
tokens are identical; first, the aten ops one batch-1 decode step dispatches, views included. Last,
in fp32, the SoftSRV train step (loss and backward to θ), which runs the same attention code:
seconds per step and whether the gradients are identical.
"""
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo root
import model as M  # noqa: E402
import runtime  # noqa: E402
import sampling  # noqa: E402
import softsrv  # noqa: E402
import weights  # noqa: E402


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_before(pos, inv_freq, dtype):
    freqs = pos[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def use_packed_gemm_before(x, w, rows):
    if x.device.type != "cpu" or x.dtype != w.dtype or (x.requires_grad and torch.is_grad_enabled()):
        return False
    if x.dtype == torch.float32:
        return M._MKL_PACK and 4 <= rows <= 256
    return x.dtype == torch.bfloat16 and M._ONEDNN_PACK_BF16 and rows <= 128


def fused_linear_before(x, layers):
    ws = [lin.weight for lin in layers]
    key = tuple((w.data_ptr(), w._version, w.dtype, w.device) for w in ws)
    cached = layers[0].__dict__.get("_fused_before")
    if cached is None or cached[0] != key:
        w = ws[0] if len(ws) == 1 else torch.cat(ws)
        cached = layers[0].__dict__["_fused_before"] = [key, w, None]
    _, w, packed = cached
    rows = x.numel() // x.shape[-1]
    if not use_packed_gemm_before(x, w, rows):
        y = F.linear(x, w)
    elif w.dtype == torch.float32:
        if packed is None:
            packed = cached[2] = torch.ops.mkl._mkl_reorder_linear_weight(w, 64)
        y = torch.ops.mkl._mkl_linear(x, packed, w, None, rows)
    else:
        if packed is None:
            packed = cached[2] = torch.ops.mkldnn._reorder_linear_weight(w, 16)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [None], "")
    return list(y.split([w_.shape[0] for w_ in ws], dim=-1)) if len(ws) > 1 else [y]


def attention_before(self, x, rope, attn_mask, cache, layer, start):
    B, T, _ = x.shape
    hd = self.cfg.head_dim
    q, k, v = fused_linear_before(x, [self.q, self.k, self.v])
    q = q.reshape(B, T, -1, hd).transpose(1, 2)
    k = k.reshape(B, T, -1, hd).transpose(1, 2)
    v = v.reshape(B, T, -1, hd).transpose(1, 2)
    cos, sin = rope                                    # [B, 1, T, hd]
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    if cache is not None:
        cache.k[layer, :, :, start:start + T] = k
        cache.v[layer, :, :, start:start + T] = v
        k = cache.k[layer, :, :, :start + T]
        v = cache.v[layer, :, :, :start + T]
    is_causal = attn_mask is None and T > 1 and start == 0
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
                                       enable_gqa=self.cfg.n_kv_head != self.cfg.n_head)
    return fused_linear_before(y.transpose(1, 2).reshape(B, T, -1), [self.o])[0]


def mlp_before(self, x):
    gate, up = fused_linear_before(x, [self.gate, self.up])
    return fused_linear_before(F.silu(gate) * up, [self.down])[0]


def logits_before(self, hidden):
    return fused_linear_before(hidden.reshape(-1, hidden.shape[-1]), [self.tok_emb])[0].view(*hidden.shape[:-1], -1)


PATCHES = {"before": (attention_before, mlp_before, logits_before, staticmethod(rope_before)),
           "after": (M.Attention.forward, M.MLP.forward, M.Transformer.logits, M.Transformer.__dict__["_rope"])}


def use(which):
    M.Attention.forward, M.MLP.forward, M.Transformer.logits, M.Transformer._rope = PATCHES[which]


class CountOps(TorchDispatchMode):
    """Counts the aten ops a piece of code dispatches (views included)."""
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def ops_per_step(m):
    """aten ops of one batch-1 decode step (forward to the logits), after a 32-token prefill."""
    cache = m.new_cache(1, 40)
    m.logits(m.hidden_states(m.embed(torch.zeros(1, 32, dtype=torch.long)), cache=cache)[:, -1])
    with CountOps() as count:
        m.logits(m.hidden_states(m.embed(torch.zeros(1, 1, dtype=torch.long)), cache=cache)[:, -1])
    return count.n


print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
runtime.keep_freed_memory()
for dtype in (torch.float32, torch.bfloat16):
    m = weights.load_model(weights.DEFAULT_MODEL, dtype=dtype)
    assert m.cfg.arch == "llama" and not m.cfg.qkv_bias and m.lm_head is None   # what the copies above cover
    counts = {}
    for which in PATCHES:
        use(which)
        counts[which] = ops_per_step(m)
    print(f"{str(dtype)[6:]} aten ops per decode step: before {counts['before']}, after {counts['after']}")
    for B in (1, 16):
        prefix = m.embed(torch.randint(0, m.cfg.vocab_size, (B, 32), generator=torch.Generator().manual_seed(0)))

        def run():
            return sampling.sample(m, prefix, 48, eos_id=None, generator=torch.Generator().manual_seed(0))
        tokens, tok_s = {}, {"before": [], "after": []}
        for which in tok_s:                              # warm-up, and the tokens to compare
            use(which)
            tokens[which] = run()
        for _ in range(4):
            for which in tok_s:
                use(which)
                t0 = time.perf_counter()
                run()
                tok_s[which].append(B * 48 / (time.perf_counter() - t0))
        print(f"{str(dtype)[6:]} batch {B:2d}: " + "; ".join(
            f"{k} " + " ".join(f"{x:.1f}" for x in sorted(v)) for k, v in tok_s.items())
            + f" tok/s; same tokens: {tokens['before'] == tokens['after']}")
    if dtype == torch.float32:   # the same code in the SoftSRV train step (backward to θ; bench.py's train workload)
        g = torch.Generator().manual_seed(0)
        init = m.tok_emb.weight[torch.randint(0, m.cfg.vocab_size, (32,), generator=g)].float()
        z = torch.randn(8, m.cfg.d_model, generator=g)
        targets = softsrv.pad_targets(torch.randint(0, m.cfg.vocab_size, (8, 64), generator=g).tolist(), eos_id=0,
                                      max_tokens=64, device="cpu")
        prompt = softsrv.SoftPromptMC(32, m.cfg.d_model, m.cfg.d_model, init)
        secs, grads = {"before": [], "after": []}, {}
        for rep in range(4):
            for which in secs:
                use(which)
                prompt.zero_grad()
                t0 = time.perf_counter()
                softsrv.softsrv_loss(m, prompt(z), targets).backward()
                secs[which].append(time.perf_counter() - t0)
                grads[which] = [p.grad.clone() for p in prompt.parameters()]
        same = all(torch.equal(a, b) for a, b in zip(grads["before"], grads["after"]))
        print("float32 train step (t=32, batch 8, 64-token targets, loss + backward): " + "; ".join(
            f"{k} " + " ".join(f"{x:.2f}" for x in sorted(v[1:])) for k, v in secs.items())
            + f" s (first call of each left out); same gradients: {same}")
    use("after")
