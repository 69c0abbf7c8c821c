"""Fewer small ops per decode step: what rotating q and k as one tensor and a leaner fused_linear
bought (README: Performance; run from the repo root):

    python results/perf/decode_ops.py > results/perf/decode_ops.txt

"before" is the decode path's code as it was at be88765 (Attention/MLP forward, the LM head,
Transformer._rope and fused_linear for a bias-free Llama-family model), copied below: q and k
rotated separately by HF's rotate_half (chunk, neg, cat), fused_linear reading weights through
Module.__getattr__ and returning its outputs split into a list. "after" is the current code:
one RoPE over the [B, T, H + Hkv, hd] block of queries and keys, rotate_half(x) * sin written as
x.roll(hd/2) * sin with sin's first half negated (the same products, so the same bits). Both run
softsrv.sample on the default model (the bench's decode workload: 32-token embedded prompt, 48 new
tokens, no EOS), alternating, four times each, same generator seed: tok/s sorted, and whether the
tokens are identical.
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.getcwd())
import model as M  # noqa: E402
import softsrv  # noqa: E402


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


print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
M.keep_freed_memory()
for dtype in (torch.float32, torch.bfloat16):
    m = M.load_model(M.DEFAULT_MODEL, dtype=dtype)
    assert m.cfg.arch == "llama" and not m.cfg.qkv_bias and m.lm_head is None   # what the copies above cover
    for B in (1, 16):
        prefix = m.embed(torch.randint(0, m.cfg.vocab_size, (B, 32), generator=torch.Generator().manual_seed(0)))

        def run():
            return softsrv.sample(m, prefix, 48, eos_id=None, generator=torch.Generator().manual_seed(0))
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
    use("after")
