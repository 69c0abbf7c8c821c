"""The frozen decoder LM of SoftSRV, written out by hand: L = H ∘ I (paper Sec. 2, SPEC §1).

- `Transformer.embed(ids)` is I: token ids [B, T] -> embeddings [B, T, d].
- `Transformer(embeds)` is H: embeddings -> next-token logits [B, T, V]. Positions live inside H,
  so a SoftSRV prompt P ∈ R^{t x d} is fed exactly like embedded text.

Three families share one code path, chosen by `ModelConfig.arch` and its flags:
- "gpt2": learned positions, LayerNorm, tanh-GELU MLP, tied head (gpt2, distilgpt2, gpt2-medium).
- "llama": RMSNorm, rotary embeddings (Hugging Face rotate-half layout), SwiGLU MLP, grouped-query
  attention, optional q/k/v bias (Qwen2), tied or untied head (SmolLM2, Llama 3.x, Qwen2.5).
- "gemma": the llama path plus embeddings scaled by sqrt(d), (1 + w) RMSNorm, GeGLU MLP (Gemma 1);
  norms after attention and MLP too, attention/final logit soft-capping, query_pre_attn_scalar,
  sliding-window layers (Gemma 2); QK-norm, 5 local : 1 global layers with their own RoPE bases
  (Gemma 3 text).

This module is the architecture only: reading a Hugging Face config.json into a `ModelConfig`, and
finding, converting and loading weights, live in weights.py; the precision choice in runtime.py.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class ModelError(ValueError):
    """A user-facing problem with a checkpoint: the message is one line naming file and tensor."""


# ----------------------------------------------------------------------------------------------
# Config

@dataclass
class ModelConfig:
    arch: str                      # "gpt2", "llama" or "gemma"
    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    d_model: int
    d_ff: int
    head_dim: int
    max_seq_len: int
    norm_eps: float
    tie_embeddings: bool = True
    qkv_bias: bool = False         # Qwen2 (and Llama with attention_bias) put a bias on q, k, v
    o_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    # Gemma family (all off for gpt2/llama)
    embed_scale: bool = False      # I(ids) = table[ids] * sqrt(d_model)
    norm_unit_offset: bool = False # RMSNorm gain is (1 + weight)
    mlp_act: str = "silu"          # gate activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    sandwich_norm: bool = False    # Gemma 2/3: a norm after attention and after the MLP as well
    qk_norm: bool = False          # Gemma 3: RMSNorm on q and k per head
    query_scale: float | None = None       # attention scale; None = head_dim ** -0.5
    attn_softcap: float | None = None      # Gemma 2: cap * tanh(scores / cap)
    final_softcap: float | None = None     # Gemma 2: cap * tanh(logits / cap)
    sliding_window: int | None = None      # local layers see this many positions (incl. their own)
    local_layers: tuple = ()               # indices of the sliding-window layers
    rope_local_theta: float | None = None  # Gemma 3: RoPE base of the local layers (None: rope_theta)
    rope_local_scaling: dict | None = None
    model_type: str = ""           # the Hugging Face model_type it came from, for the record


# ----------------------------------------------------------------------------------------------
# Rotary embeddings (Llama family). Hugging Face "rotate-half" layout: the two halves of each head
# are the (x, y) of each rotated pair.

def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> torch.Tensor:
    """The rotary frequencies of the global layers, or (local=True) of Gemma 3's sliding-window ones."""
    theta, sc = (cfg.rope_local_theta, cfg.rope_local_scaling) if local else (cfg.rope_theta, cfg.rope_scaling)
    inv_freq = 1.0 / (theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    if not sc:
        return inv_freq
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / sc["factor"]
    if kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_ctx = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        return torch.where(medium, blended, scaled)
    raise ModelError(f"config.json: rope scaling type '{kind}' is not supported (default, linear, llama3)")


_MKL_PACK = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
_ONEDNN_PACK_BF16 = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                     and torch.ops.mkldnn._is_mkldnn_bf16_supported())


_ROW_INVARIANT = [False]     # inside row_invariant(): packed GEMMs at any number of rows


@contextmanager
def row_invariant():
    """Inside it, a frozen weight's product with a row does not depend on how many rows there are:
    every row count takes the packed GEMM (MKL's fp32, oneDNN's bf16), whose result for a row is
    the same at 4 rows or 2,000, and MKL's rows are padded to a multiple of 4 (fused_linear).
    Plain F.linear switches kernels with the row count (one row: a GEMV), so a prompt's logits would
    change with the batch it shares. RowCache forwards run inside it; so does the sampler's LM head."""
    before = _ROW_INVARIANT[0]
    _ROW_INVARIANT[0] = True
    try:
        yield
    finally:
        _ROW_INVARIANT[0] = before


def _use_packed_gemm(x: torch.Tensor, w: torch.Tensor, rows: int) -> bool:
    """Whether a frozen weight's product with these rows takes a prepacked GEMM (docs/performance.md):
    fp32 through MKL's packed GEMM at 4-256 rows (below 4 rows the product is memory-bound, and from
    a few hundred rows the pack's cost is amortized anyway, so it gains nothing there, or loses);
    bf16 through oneDNN's at 1-128 rows (beyond that it stops paying). Neither has a backward, so
    not where x's gradient is wanted."""
    if not x.is_cpu or x.dtype != w.dtype or (x.requires_grad and torch.is_grad_enabled()):
        return False
    if _ROW_INVARIANT[0]:                  # a RowCache forward: every row count (see RowCache)
        return _MKL_PACK if x.dtype == torch.float32 else x.dtype == torch.bfloat16 and _ONEDNN_PACK_BF16
    if x.dtype == torch.float32:
        return _MKL_PACK and 4 <= rows <= 256
    return x.dtype == torch.bfloat16 and _ONEDNN_PACK_BF16 and rows <= 128


def fused_linear(x: torch.Tensor, layers: list[nn.Module]) -> torch.Tensor:
    """Linear layers of the same input (q/k/v; SwiGLU's gate/up; or just one) as ONE matmul,
    on a prepacked weight where that pays: their outputs side by side in the last dimension.

    Why: a decode step's matmuls have a few rows, and on a CPU each call pays a fixed cost: thread
    start-up, and repacking the weight into the BLAS kernel's layout, which at a few rows costs as
    much as the product itself. So frozen weights are concatenated (2 calls instead of 5 per block)
    and packed once into the GEMM kernel's layout (the packed GEMMs torch.compile's freezing uses:
    MKL's for fp32, oneDNN's for bf16), which makes the few-row matmuls of decoding several times
    faster (docs/performance.md, docs/perf/micro.py). The cached copies are rebuilt when a weight changes (moved, cast or
    updated in place); weights being trained (fine-tuning) take plain matmuls. Layers need a
    `weight` parameter; a missing `bias` counts as none, so the tied LM head passes its nn.Embedding.
    """
    # Not lin.weight: Module.__getattr__ is slow next to a dict lookup, and a decode step makes a few of these calls per block.
    ws = [lin._parameters["weight"] for lin in layers]
    if any(w.requires_grad for w in ws):
        ys = [F.linear(x, w, lin._parameters.get("bias")) for w, lin in zip(ws, layers)]
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
    # CPU and GPU memory are one address space, so the pointer also tells the device.
    key = [(w.data_ptr(), w._version, w.dtype) for w in ws]
    cached = layers[0].__dict__.get("_fused")          # a plain attribute: not in the state dict
    if cached is None or cached[0] != key:
        biases = [lin._parameters.get("bias") for lin in layers]
        w = ws[0] if len(ws) == 1 else torch.cat(ws)
        bias = None if biases[0] is None else biases[0] if len(ws) == 1 else torch.cat(biases)
        cached = layers[0].__dict__["_fused"] = [key, w, bias, None]   # packed on first use
    _, w, bias, packed = cached
    rows = x.numel() // x.shape[-1]
    if not _use_packed_gemm(x, w, rows):
        y = F.linear(x, w, bias)
    elif w.dtype == torch.float32:
        if packed is None:                             # only runs that use it pay its memory
            packed = cached[3] = torch.ops.mkl._mkl_reorder_linear_weight(w, 64)
        pad = -rows % 4 if _ROW_INVARIANT[0] else 0
        if pad:
            # MKL computes rows in blocks of 4 and the last, partial block with another kernel whose
            # last bits differ (seen on AMD EPYC CPUs; one row may even take a GEMV path), so a row
            # would change with the batch: the rows are padded to whole blocks.
            x2 = x.reshape(rows, -1)
            x2 = torch.cat([x2, x2[-1:].expand(pad, -1)])
            return torch.ops.mkl._mkl_linear(x2, packed, w, bias, rows + pad)[:rows].view(*x.shape[:-1], -1)
        y = torch.ops.mkl._mkl_linear(x, packed, w, bias, rows)
    else:
        if packed is None:
            packed = cached[3] = torch.ops.mkldnn._reorder_linear_weight(w, 16)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [None], "")
    return y


# ----------------------------------------------------------------------------------------------
# KV cache

class KVCache:
    """Keys and values of every layer, preallocated for (batch, max_len).

    `mask[b, s]` says whether slot s of row b holds a real token (False for padding), `pos[b, s]`
    its position id (sliding windows count positions), and `next_pos[b]` is the position id the
    next real token of row b gets. Rows of different lengths
    are prefilled left-padded, so all rows append their decode steps at the same slot.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype=torch.float32, device="cpu"):
        shape = (cfg.n_layer, batch, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.pos = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0          # slots used so far (the same for all rows)
        self.padded = False      # True once any row has a padding slot: then masks are needed

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def keep_rows(self, keep: torch.Tensor):
        """Drop the rows where `keep` is False (finished samples stop costing compute)."""
        self.k, self.v = self.k[:, keep], self.v[:, keep]
        self.mask, self.pos, self.next_pos = self.mask[keep], self.pos[keep], self.next_pos[keep]


class SharedPrefix:
    """The keys and values of a token prefix every row shares (k-shot exemplars, a fixed instruction),
    computed once by `Transformer.shared_prefix` and stored once: [n_layer, n_kv_head, length, head_dim].
    Its tokens sit at positions 0..length-1; a RowCache built on it puts its rows after them."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    @property
    def length(self) -> int:
        return self.k.shape[2]


class RowCache:
    """A KV cache whose rows are independent sequences, each at its own length: continuous batching.

    Row b holds its tokens in slots [0, lengths[b]) at positions prefix_len + slot, without padding,
    so a row can be emptied (`lengths[b] = 0`) and refilled with a new prompt while the other rows
    keep decoding. A block fed to it is right-padded (attention_mask True on each row's real tokens,
    first): row b's block goes to slots lengths[b], lengths[b] + 1, ...; its padding writes past the
    row's new length, where no real query looks and the next block overwrites it. The shared prefix,
    if any, is not copied into the rows: every query attends to its one copy and then to its own row.
    """

    BLOCK = 64   # attention reads whole blocks of slots (see Attention._attend_rows)

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype=torch.float32, device="cpu",
                 prefix: SharedPrefix | None = None):
        max_len = -(-max_len // self.BLOCK) * self.BLOCK
        shape = (cfg.n_layer, batch, cfg.n_kv_head, max_len, cfg.head_dim)
        # zeros, not empty: slots a row has not written are attended (with weight 0) and must be finite
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.prefix = prefix
        self._write = None       # set by Transformer.hidden_states for the block being run

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def prefix_len(self) -> int:
        return 0 if self.prefix is None else self.prefix.length

    def rows(self, start: int, stop: int) -> "RowCache":
        """Rows start..stop-1 as a cache of their own that writes into this one (a view: no copy)."""
        view = RowCache.__new__(RowCache)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.lengths, view.prefix, view._write = self.lengths[start:stop], self.prefix, None
        return view

    def keep_rows(self, keep: torch.Tensor):
        """Keep only the rows where `keep` is True (in order); copies just the slots in use."""
        used = int(self.lengths.max()) if self.batch else 0
        k = torch.zeros_like(self.k[:, :int(keep.sum())])
        v = torch.zeros_like(k)
        k[:, :, :, :used], v[:, :, :, :used] = self.k[:, keep, :, :used], self.v[:, keep, :, :used]
        self.k, self.v, self.lengths = k, v, self.lengths[keep]

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a block's keys and values [B, Hkv, T, hd] at each row's slots; return the rows' keys
        and values up to the longest one [B, Hkv, S, hd] (views)."""
        start, rows, slots, S = self._write
        if start is not None:             # every row at the same length (a fresh prefill): a slice
            self.k[layer, :, :, start:start + k.shape[2]] = k
            self.v[layer, :, :, start:start + k.shape[2]] = v
        else:
            self.k[layer][rows, :, slots] = k.transpose(1, 2)
            self.v[layer][rows, :, slots] = v.transpose(1, 2)
        return self.k[layer, :, :, :S], self.v[layer, :, :, :S]


# ----------------------------------------------------------------------------------------------
# Modules

class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(d) if unit_offset else torch.ones(d))

    def forward(self, x):
        # Normalize in fp32 as the reference does; Llama casts back before the gain, Gemma after it.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (h * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hd, d = cfg.head_dim, cfg.d_model
        self.q = nn.Linear(d, cfg.n_head * hd, bias=cfg.qkv_bias)
        self.k = nn.Linear(d, cfg.n_kv_head * hd, bias=cfg.qkv_bias)
        self.v = nn.Linear(d, cfg.n_kv_head * hd, bias=cfg.qkv_bias)
        self.o = nn.Linear(cfg.n_head * hd, d, bias=cfg.o_bias)
        self.q_norm = RMSNorm(hd, cfg.norm_eps, True) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps, True) if cfg.qk_norm else None
        self.scale = cfg.query_scale if cfg.query_scale is not None else hd ** -0.5
        self.softcap = cfg.attn_softcap

    def forward(self, x, rope, attn_mask, cache: KVCache | None, layer: int, start: int):
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        H, Hkv = self.cfg.n_head, self.cfg.n_kv_head
        qkv = fused_linear(x, [self.q, self.k, self.v]).view(B, T, H + 2 * Hkv, hd)
        qk, v = qkv.split([H + Hkv, Hkv], dim=2)                        # queries and keys: one tensor
        if self.q_norm is not None:
            q, k = qk.split([H, Hkv], dim=2)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=2)
        if rope is not None:
            cos, sin = rope   # [B, T, 1, hd]; rotate_half(x) * sin == x.roll(hd/2) * sin with sin's first half negated
            qk = qk * cos + qk.roll(hd // 2, -1) * sin
        q, k = qk.split([H, Hkv], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)        # [B, heads, T, hd]
        if isinstance(cache, RowCache):
            k, v = cache.store(layer, k, v)
            y = self._attend_rows(q, k, v, attn_mask, cache.prefix, layer)
            return fused_linear(y.transpose(1, 2).reshape(B, T, -1), [self.o])
        if cache is not None:
            cache.k[layer, :, :, start:start + T] = k
            cache.v[layer, :, :, start:start + T] = v
            k = cache.k[layer, :, :, :start + T]
            v = cache.v[layer, :, :, :start + T]
        if self.softcap is not None:
            y = self._softcapped(q, k, v, attn_mask)
        else:
            is_causal = attn_mask is None and T > 1 and start == 0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
                                               enable_gqa=self.cfg.n_kv_head != self.cfg.n_head)
        return fused_linear(y.transpose(1, 2).reshape(B, T, -1), [self.o])

    def _attend_rows(self, q, k, v, masks, prefix: SharedPrefix | None, layer: int):
        """Attention over a RowCache: q [B, H, T, hd] against the shared prefix (one copy for every
        row) and each row's own keys k, v [B, Hkv, S, hd]; masks = (row mask [B, 1, T, S], prefix
        mask [B, 1, T, P] or None = all visible). The scores of both parts go through one softmax;
        each kv head's queries of all rows are one matmul against the prefix, so the prefix is read
        once per step, not once per row.
        A row's result must not depend on the other rows (RowCache): the keys come in whole blocks of
        64, and with that these batched matmuls give a row the same result at any batch size and key
        count (measured: fp32 and bf16, head_dim 12-64, 1-16 rows, 64-1024 keys; at other key counts
        the kernels' blocking moves the last bits). SDPA does not, even so (its result for one row
        moved with the batch in a decode step), so it only runs the prefill of a single row without a
        prefix (one prompt's prefill, whose shapes depend on that prompt alone): the fused kernel
        does not hold [T, S] scores in memory.
        """
        row_mask, prefix_mask = masks
        B, H, T, hd = q.shape
        if prefix is None and self.softcap is None and B == 1 and T > 1:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=row_mask, scale=self.scale,
                                                  enable_gqa=self.cfg.n_kv_head != self.cfg.n_head)
        Hkv = k.shape[1]
        rep = H // Hkv
        qg = q.reshape(B, Hkv, rep * T, hd)                       # the queries of each kv head
        scores = qg @ k.transpose(-1, -2)                           # [B, Hkv, rep*T, S]
        mask, P = row_mask, 0
        if prefix is not None:
            pk, pv = prefix.k[layer], prefix.v[layer]               # [Hkv, P, hd]
            P = pk.shape[1]
            ps = qg.transpose(0, 1).reshape(Hkv, B * rep * T, hd) @ pk.transpose(-1, -2)
            scores = torch.cat([ps.view(Hkv, B, rep * T, P).transpose(0, 1), scores], dim=-1)
            pm = prefix_mask if prefix_mask is not None else row_mask.new_ones(1, 1, 1, 1)
            mask = torch.cat([pm.expand(B, 1, T, P), row_mask], dim=-1)
        scores = scores * self.scale
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        scores = scores.view(B, Hkv, rep, T, -1).masked_fill(~mask[:, :, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype).view(B, Hkv, rep * T, -1)
        y = probs[..., P:] @ v                                      # [B, Hkv, rep*T, hd]
        if prefix is not None:
            pp = probs[..., :P].transpose(0, 1).reshape(Hkv, B * rep * T, P)
            y = y + (pp @ pv).view(Hkv, B, rep * T, hd).transpose(0, 1)
        return y.reshape(B, H, T, hd)

    def _softcapped(self, q, k, v, attn_mask):
        """Gemma 2 attention: the scores are soft-capped before the mask, which SDPA cannot do.
        The caller always passes an explicit mask on this path."""
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-1, -2)) * self.scale
        scores = torch.tanh(scores / self.softcap) * self.softcap
        scores = scores.masked_fill(~attn_mask, float("-inf"))
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f, b = cfg.d_model, cfg.d_ff, cfg.mlp_bias
        self.gelu = cfg.arch == "gpt2"
        self.gated_gelu = cfg.mlp_act == "gelu_tanh"
        if self.gelu:
            self.fc, self.proj = nn.Linear(d, f, bias=b), nn.Linear(f, d, bias=b)
        else:
            self.gate, self.up, self.down = nn.Linear(d, f, bias=b), nn.Linear(d, f, bias=b), nn.Linear(f, d, bias=b)

    def forward(self, x):
        if self.gelu:
            return fused_linear(F.gelu(fused_linear(x, [self.fc]), approximate="tanh"), [self.proj])
        gate, up = fused_linear(x, [self.gate, self.up]).chunk(2, dim=-1)
        if self.gated_gelu:
            return fused_linear(F.gelu(gate, approximate="tanh") * up, [self.down])  # GeGLU
        return fused_linear(F.silu(gate) * up, [self.down])                          # SwiGLU


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "gpt2":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
    return RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_unit_offset)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.local = layer in cfg.local_layers    # picks the sliding-window mask and the local RoPE
        self.norm1, self.attn, self.norm2, self.mlp = make_norm(cfg), Attention(cfg), make_norm(cfg), MLP(cfg)
        # Gemma 2/3 also normalize each branch's output before adding it to the residual stream.
        self.post_attn_norm = make_norm(cfg) if cfg.sandwich_norm else None
        self.post_mlp_norm = make_norm(cfg) if cfg.sandwich_norm else None

    def forward(self, x, ropes, masks, cache, start):
        h = self.attn(self.norm1(x), ropes[self.local], masks[self.local], cache, self.layer, start)
        if self.post_attn_norm is None:
            x = x + h
            return x + self.mlp(self.norm2(x))
        x = x + self.post_attn_norm(h)
        return x + self.post_mlp_norm(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.source_dir: Path | None = None     # the folder load_model read (save_model copies its files)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.arch == "gpt2" else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.arch != "gpt2":
            self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
            if cfg.rope_local_theta is not None:
                self.register_buffer("inv_freq_local", rope_inv_freq(cfg, local=True), persistent=False)

    @property
    def device(self):
        return self.tok_emb.weight.device

    @property
    def dtype(self):
        return self.tok_emb.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """I: token ids [B, T] -> input embeddings [B, T, d]. For Gemma this includes the sqrt(d)
        scale, so that a soft prompt P lives in the same space as embedded text (L = H ∘ I)."""
        e = self.tok_emb(ids)
        if self.cfg.embed_scale:   # rounded to the model's dtype first, as the reference does
            e = e * torch.tensor(self.cfg.d_model ** 0.5, dtype=e.dtype, device=e.device)
        return e

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head: final hidden states [..., d] -> logits [..., V]."""
        head = self.tok_emb if self.lm_head is None else self.lm_head
        # As one 2-D matmul: on a 3-D (or sliced) input F.linear may batch it and copy w per row.
        out = fused_linear(hidden.reshape(-1, hidden.shape[-1]), [head]).view(*hidden.shape[:-1], -1)
        if self.cfg.final_softcap is not None:
            out = torch.tanh(out / self.cfg.final_softcap) * self.cfg.final_softcap
        return out

    def hidden_states(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      cache: KVCache | None = None, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """H without its head: embeddings [B, T, d] -> final (normed) hidden states [B, T, d].

        attention_mask [B, T] (True = real token) marks padding in this block. Without a cache,
        right padding needs no mask at all: causal attention never lets a real token see the pad
        tokens after it. Left padding (and any padding with a cache) needs the mask.
        segment_ids [B, T] packs several sequences into one row (fine-tuning): each contiguous run
        of equal ids is its own sequence, attending only to itself, with positions from 0.
        """
        if isinstance(cache, RowCache):
            return self._hidden_rows(embeds, attention_mask, cache)
        B, T, _ = embeds.shape
        dev = embeds.device
        start = 0 if cache is None else cache.length
        valid = attention_mask.bool() if attention_mask is not None else torch.ones(B, T, dtype=torch.bool, device=dev)
        # Position ids count real tokens only, so a left-padded row starts at position 0.
        first = cache.next_pos[:, None] if cache is not None else 0
        pos = (first + valid.long().cumsum(1) - 1).clamp(min=0)
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids (packed sequences) cannot be used with a KV cache")
            t = torch.arange(T, device=dev).expand(B, T)
            starts = torch.ones(B, T, dtype=torch.bool, device=dev)
            starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
            pos = t - torch.where(starts, t, 0).cummax(1).values        # restart at each segment
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} slots; {start + T} needed")
        if self.pos_emb is not None and int(pos.max()) >= self.cfg.max_seq_len:
            raise ValueError(f"sequence longer than the model's {self.cfg.max_seq_len} positions")

        cfg = self.cfg
        # Sliding-window layers need their own mask only once keys can lie a window or more back.
        windowed = bool(cfg.local_layers) and start + T > cfg.sliding_window
        explicit = windowed or cfg.attn_softcap is not None     # the soft-capped path needs a mask
        attn_mask, key_pos = None, pos
        if cache is not None:
            cache.mask[:, start:start + T] = valid
            cache.pos[:, start:start + T] = pos
            cache.next_pos += valid.long().sum(1)
            cache.padded = cache.padded or not bool(valid.all())
            if cache.padded or (start > 0 and T > 1) or explicit:
                attn_mask = self._mask(cache.mask[:, :start + T], start, T)
                key_pos = cache.pos[:, :start + T]
        elif segment_ids is not None:
            same = segment_ids[:, :, None] == segment_ids[:, None, :]
            attn_mask = (same & torch.ones(T, T, dtype=torch.bool, device=dev).tril())[:, None]
        elif explicit or (attention_mask is not None and not bool(valid.all())):
            attn_mask = self._mask(valid, 0, T)
        local_mask = attn_mask
        if windowed:   # Gemma 2/3: a local layer's query sees keys less than `sliding_window` positions back
            local_mask = attn_mask & ((pos[:, None, :, None] - key_pos[:, None, None, :]) < cfg.sliding_window)
        masks = (attn_mask, local_mask)          # indexed by Block.local

        x, ropes = self._positions(embeds, pos)
        for block in self.blocks:
            x = block(x, ropes, masks, cache, start)
        if cache is not None:
            cache.length += T
        return self.norm_f(x)

    def _hidden_rows(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None, cache: "RowCache"):
        """hidden_states on a RowCache: row b's block (right-padded; attention_mask marks its real
        tokens) continues that row at slot cache.lengths[b], position prefix_len + slot."""
        B, T, _ = embeds.shape
        dev, cfg = embeds.device, self.cfg
        start = cache.lengths
        n = attention_mask.long().sum(1) if attention_mask is not None else torch.full_like(start, T)
        slots = start[:, None] + torch.arange(T, device=dev)                     # [B, T]
        S = int(start.max()) + T
        if S > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} slots; {S} needed")
        S = min(-(-S // cache.BLOCK) * cache.BLOCK, cache.max_len)       # see Attention._attend_rows
        P = cache.prefix_len
        pos = P + slots
        if self.pos_emb is not None:
            if int((P + start + n).max()) > cfg.max_seq_len:
                raise ValueError(f"sequence longer than the model's {cfg.max_seq_len} positions")
            pos = pos.clamp(max=cfg.max_seq_len - 1)                              # padding only
        first = int(start.min())
        cache._write = (first if first == int(start.max()) else None, torch.arange(B, device=dev)[:, None], slots, S)
        key = torch.arange(S, device=dev)
        row_mask = (key <= slots[:, :, None])[:, None]                          # [B, 1, T, S]
        glob = local = (row_mask, None)
        if cfg.local_layers and P + S > cfg.sliding_window:   # a local layer sees `sliding_window` positions back
            w = cfg.sliding_window
            local_row = row_mask & ((slots[:, :, None] - key) < w)[:, None]
            local_pre = ((pos[:, :, None] - torch.arange(P, device=dev)) < w)[:, None] if P else None
            local = (local_row, local_pre)
        x, ropes = self._positions(embeds, pos)
        try:
            with row_invariant():
                for block in self.blocks:
                    x = block(x, ropes, (glob, local), cache, 0)
        finally:
            cache._write = None
        cache.lengths += n
        return self.norm_f(x)

    @torch.no_grad()
    def shared_prefix(self, embeds: torch.Tensor) -> SharedPrefix:
        """The keys and values of a prefix [1, P, d] that every row of a RowCache will continue."""
        P = embeds.shape[1]
        cache = RowCache(self.cfg, 1, P, dtype=self.dtype, device=self.device)
        self.hidden_states(embeds.to(self.dtype), cache=cache)
        return SharedPrefix(cache.k[:, 0, :, :P].contiguous(), cache.v[:, 0, :, :P].contiguous())

    def new_row_cache(self, batch: int, max_len: int, prefix: SharedPrefix | None = None) -> "RowCache":
        return RowCache(self.cfg, batch, max_len, dtype=self.dtype, device=self.device, prefix=prefix)

    def _positions(self, embeds: torch.Tensor, pos: torch.Tensor):
        """Token positions into the model: GPT-2 adds learned position embeddings to the input; RoPE
        models get (global, local) rotations for the attention layers (Gemma 3's local layers use their
        own base)."""
        if self.pos_emb is not None:
            return embeds + self.pos_emb(pos), (None, None)
        ropes = (self._rope(pos, self.inv_freq, embeds.dtype),) * 2
        if self.cfg.rope_local_theta is not None:
            ropes = (ropes[0], self._rope(pos, self.inv_freq_local, embeds.dtype))
        return embeds, ropes

    @staticmethod
    def _rope(pos: torch.Tensor, inv_freq: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = pos[..., None, None].float() * inv_freq                 # [B, T, 1, hd/2]
        cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)   # [B, T, 1, hd]

    @staticmethod
    def _mask(key_valid: torch.Tensor, start: int, T: int) -> torch.Tensor:
        """Boolean [B, 1, T, S] mask: causal, and only real keys. A query that is itself padding
        may still see itself, so no row is empty (an empty row makes softmax NaN)."""
        S = key_valid.shape[1]
        q_idx = torch.arange(start, start + T, device=key_valid.device)[:, None]
        k_idx = torch.arange(S, device=key_valid.device)[None, :]
        allowed = (k_idx <= q_idx)[None] & key_valid[:, None, :]
        return (allowed | (k_idx == q_idx)[None])[:, None]

    def forward(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, return_hidden: bool = False,
                segment_ids: torch.Tensor | None = None):
        """H: embeddings [B, T, d] -> logits [B, T, V] (and the final hidden states if asked)."""
        h = self.hidden_states(embeds, attention_mask, cache, segment_ids)
        return (self.logits(h), h) if return_hidden else self.logits(h)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.cfg, batch, max_len, dtype=self.dtype, device=self.device)

