"""One decode step's attention, per layer call, at the answer step's shapes (run from the repo root):

    python docs/perf/attend_rows.py > docs/perf/attend_rows.txt

The row-invariant attention over a RowCache (Attention._attend_rows) against SDPA on the same keys,
and its pieces: the scores matmul on keys sliced out of a longer row buffer (as RowCache.store returns
them) and on the whole buffer, the softmax, and the probabilities times the values. Default model,
bf16, 16 rows, one query per head (9 heads over 3 kv heads), 256 keys in use of a 448-slot buffer.
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo root

from model import Attention  # noqa: E402
from weights import load_model  # noqa: E402

torch.manual_seed(0)
dt = torch.bfloat16
att = next(m for m in load_model(dtype=dt).modules() if isinstance(m, Attention))
B, H, Hkv, hd, S, slots = 16, att.cfg.n_head, att.cfg.n_kv_head, att.cfg.head_dim, 256, 448
q = torch.randn(B, H, 1, hd, dtype=dt)
kbuf, vbuf = torch.randn(B, Hkv, slots, hd, dtype=dt), torch.randn(B, Hkv, slots, hd, dtype=dt)
k, v = kbuf[:, :, :S], vbuf[:, :, :S]                   # a slice of each row's buffer: RowCache.store
lens = torch.randint(100, S, (B,))
mask = (torch.arange(S) <= lens[:, None, None])[:, None]
mask_buf = (torch.arange(slots) <= lens[:, None, None])[:, None]


def us(fn, n=200):
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


qg = q.reshape(B, Hkv, H // Hkv, hd)
p = torch.softmax(qg @ k.transpose(-1, -2), -1, dtype=torch.float32).to(dt)
rows = [("_attend_rows, sliced keys (as used)", lambda: att._attend_rows(q, k, v, (mask, None), None, 0)),
        ("_attend_rows, whole buffer", lambda: att._attend_rows(q, kbuf, vbuf, (mask_buf, None), None, 0)),
        ("SDPA, sliced keys", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=att.scale,
                                                                     enable_gqa=True)),
        ("SDPA, whole buffer", lambda: F.scaled_dot_product_attention(q, kbuf, vbuf, attn_mask=mask_buf,
                                                                      scale=att.scale, enable_gqa=True)),
        ("scores matmul, sliced keys", lambda: qg @ k.transpose(-1, -2)),
        ("scores matmul, sliced keys made contiguous", lambda: qg @ k.contiguous().transpose(-1, -2)),
        ("scores matmul, whole buffer", lambda: qg @ kbuf.transpose(-1, -2)),
        ("softmax (fp32) and cast", lambda: torch.softmax(p, -1, dtype=torch.float32).to(dt)),
        ("probabilities @ values, sliced", lambda: p @ v)]
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16, B={B}, {S} keys of {slots} slots")
for name, fn in rows:
    print(f"{name:45s} {us(fn):8.1f} us")
