"""The Gemma family (1, 2, 3 text) in the hand-written decoder against transformers (the oracle) on
small random configs, the offline gemma3-270m backbone against transformers reading the same GGUF,
and the SentencePiece-style tokenizer against the oracle tokenizer."""
import json

import pytest
import torch

from conftest import save_hf
from model import load_model

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
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, V, (n,), generator=g) for n in (3, 12, 8)]
    nxt = torch.randint(0, V, (3, 7), generator=g)
    T = 12
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = r, True
    cache = model.new_cache(3, T + 7)
    with torch.no_grad():
        pre = model(model.embed(ids), attention_mask=mask, cache=cache)
        dec = torch.cat([model(model.embed(nxt[:, i:i + 1]), cache=cache) for i in range(7)], 1)
    assert (pre[mask] - logits_of(hf, ids, mask.long(), hf=True)[mask]).abs().max().item() < TOL
    for b, r in enumerate(rows):
        alone = logits_of(hf, torch.cat([r, nxt[b]])[None], hf=True)[0]
        got = torch.cat([pre[b, T - len(r):], dec[b]])
        assert (got - alone).abs().max().item() < TOL, f"row {b}"


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
    from model import save_model
    family, _, model, folder = pair
    out = save_model(model, tmp_path / "saved")
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(6))
    want = logits_of(model, ids)
    assert (logits_of(load_model(out), ids) - want).abs().max().item() < TOL
    back = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert (logits_of(back, ids, hf=True) - want).abs().max().item() < TOL
