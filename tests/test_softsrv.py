"""SoftSRV on a tiny random backbone: the parameterizations, the loss, sampling, train.py and
generate.py end to end."""
import json

import pytest
import torch
import torch.nn.functional as F

import data
from conftest import QUESTIONS
from sampling import draw, filter_logits, sample
from softsrv import ContextEncoder, build_soft_prompt, load_checkpoint, pad_targets, softsrv_loss

TEXTS = QUESTIONS


@pytest.fixture(scope="module")
def z(tiny_lm):
    model, tok = tiny_lm
    return ContextEncoder(model, tok)(TEXTS)


def fit(model, prompt, z, targets, opt, steps) -> list[float]:
    """`steps` full-batch optimizer steps on (z, targets); the loss before each step."""
    losses = []
    for _ in range(steps):
        loss = softsrv_loss(model, prompt(z), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", ["np", "mp", "mc"])
def test_shapes(kind, tiny_lm, z):
    model, _ = tiny_lm
    prompt = build_soft_prompt(kind, model, z.shape[1], t=5, k=3)
    prompt.init_from_contexts(z)
    assert prompt(z[:4]).shape == (4, 5, model.cfg.d_model)


def test_context_encoder_masks_padding(tiny_lm):
    """z of a text must not depend on the other (longer) texts in its batch."""
    model, tok = tiny_lm
    enc = ContextEncoder(model, tok, batch_size=4)
    alone = enc([TEXTS[0]])
    batched = enc([TEXTS[0], TEXTS[1] * 3, TEXTS[2]])
    assert torch.allclose(alone[0], batched[0], atol=1e-5)
    ids = torch.tensor([tok.encode(TEXTS[0])])
    assert torch.allclose(alone[0], model.hidden_states(model.embed(ids))[0].mean(0), atol=1e-5)


def test_contexts_change_contextual_prompts_only(tiny_lm, z):
    model, _ = tiny_lm
    for kind, contextual in [("np", False), ("mp", True), ("mc", True)]:
        prompt = build_soft_prompt(kind, model, z.shape[1], t=4)
        prompt.init_from_contexts(z)
        if kind == "mp":   # the bases start equal (MP starts as NP); give them distinct values as training does
            with torch.no_grad():
                prompt.D.normal_()
        p = prompt(z[:2])
        assert torch.allclose(p[0], p[1]) != contextual, kind


@pytest.mark.parametrize("kind", ["np", "mp", "mc"])
def test_gradients_reach_theta_and_nothing_else(kind, tiny_lm, z):
    model, tok = tiny_lm
    prompt = build_soft_prompt(kind, model, z.shape[1], t=4)
    prompt.init_from_contexts(z)
    targets = pad_targets([tok.encode(t) for t in TEXTS[:3]], tok.eos_id, 64, "cpu")
    # one step first: at step 0 MP's bases are equal, so W_φ has no gradient yet
    opt = torch.optim.Adam(prompt.parameters(), lr=1e-2)
    softsrv_loss(model, prompt(z[:3]), targets).backward()
    opt.step()
    opt.zero_grad()
    softsrv_loss(model, prompt(z[:3]), targets).backward()
    for name, p in prompt.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert all(b.grad is None for b in prompt.buffers())


def test_loss_is_cross_entropy_of_x_and_eos_after_the_prompt(tiny_lm):
    model, tok = tiny_lm
    P = torch.randn(2, 3, model.cfg.d_model)
    ids = [tok.encode(TEXTS[0]), tok.encode(TEXTS[1])[:5]]
    got = softsrv_loss(model, P, pad_targets(ids, tok.eos_id, 64, "cpu"))
    total, count = 0.0, 0
    for b, x in enumerate(ids):
        seq = torch.tensor(x + [tok.eos_id])
        logits = model(torch.cat([P[b], model.embed(seq[:-1])])[None])[0]
        total += F.cross_entropy(logits[2:], seq, reduction="sum")   # last soft token predicts x_1
        count += len(seq)
    assert torch.allclose(got, total / count, atol=1e-5)


def test_mp_routing_starts_as_soft_kmeans(tiny_lm, z):
    """W_φ starts as the k-means clustering of the standardized contexts, soft but decisive."""
    from sklearn.cluster import KMeans
    model, _ = tiny_lm
    prompt = build_soft_prompt("mp", model, z.shape[1], t=4, k=3)
    prompt.init_from_contexts(z, seed=0)
    w = torch.softmax(prompt.W_phi(prompt.standardize(z)), dim=-1)
    labels = KMeans(3, n_init=10, random_state=0).fit(prompt.standardize(z).double().numpy()).labels_
    assert torch.equal(w.argmax(1), torch.from_numpy(labels).long())
    top2 = w.log().sort(dim=1, descending=True).values
    assert torch.allclose((top2[:, 0] - top2[:, 1]).median(), torch.tensor(2.0), atol=1e-3)


def test_mp_starts_as_np_and_bases_specialize(tiny_lm, z):
    """MPk starts as NP's prompt for every z; routed from step 0, its k bases then get different
    gradients and move apart (with a uniform mix they would get identical Adam updates and MPk
    would stay NP)."""
    model, tok = tiny_lm
    np_prompt = build_soft_prompt("np", model, z.shape[1], t=4, seed=3)
    prompt = build_soft_prompt("mp", model, z.shape[1], t=4, k=2, seed=3)
    prompt.init_from_contexts(z)
    assert torch.equal(prompt(z), np_prompt(z))
    opt = torch.optim.Adam(prompt.parameters(), lr=1e-2)
    targets = pad_targets([tok.encode(t) for t in TEXTS], tok.eos_id, 64, "cpu")
    fit(model, prompt, z, targets, opt, 10)
    P = prompt.P.detach()
    assert (P[0] - P[1]).norm() > 0.3 * (P - prompt.P_bar.detach()).norm(dim=(1, 2)).max()
    p = prompt(z).detach()
    assert not torch.allclose(p[0], p[1])


@pytest.mark.parametrize("kind", ["np", "mp", "mc"])
def test_only_mp_deviations_are_decayed(kind, tiny_lm, z):
    """--mp-decay reaches SS_MP's deviations D and nothing else (NP and MC train with plain Adam)."""
    model, _ = tiny_lm
    prompt = build_soft_prompt(kind, model, z.shape[1], t=4)
    groups = prompt.param_groups(3.0)
    in_groups = [p for g in groups for p in g["params"]]
    assert len(in_groups) == len(list(prompt.parameters()))
    assert {id(p) for p in in_groups} == {id(p) for p in prompt.parameters()}
    decayed = [p for g in groups if g["weight_decay"] for p in g["params"]]
    assert [id(p) for p in decayed] == ([id(prompt.D)] if kind == "mp" else [])


def test_mp_decay_pulls_the_bases_together(tiny_lm, z):
    """Same init, same batches: with the decay the k bases end closer together, yet still apart."""
    model, tok = tiny_lm
    targets = pad_targets([tok.encode(t) for t in TEXTS], tok.eos_id, 64, "cpu")
    spread = {}
    for decay in (0.0, 10.0):
        prompt = build_soft_prompt("mp", model, z.shape[1], t=4, k=2, seed=3)
        prompt.init_from_contexts(z)
        opt = torch.optim.AdamW(prompt.param_groups(decay), lr=1e-2)
        fit(model, prompt, z, targets, opt, 10)
        spread[decay] = prompt.deviations().norm().item()
    assert 0 < spread[10.0] < 0.8 * spread[0.0], spread


def test_mp_needs_k_examples(tiny_lm, z):
    model, _ = tiny_lm
    prompt = build_soft_prompt("mp", model, z.shape[1], t=4, k=3)
    with pytest.raises(ValueError, match="--k 3"):
        prompt.init_from_contexts(z[:2])


@pytest.mark.parametrize("kind", ["np", "mp", "mc"])
def test_loss_falls_on_a_tiny_dataset(kind, tiny_lm, z):
    model, tok = tiny_lm
    torch.manual_seed(0)
    prompt = build_soft_prompt(kind, model, z.shape[1], t=4)
    prompt.init_from_contexts(z)
    opt = torch.optim.Adam(prompt.parameters(), lr=1e-2)
    targets = pad_targets([tok.encode(t) for t in TEXTS], tok.eos_id, 64, "cpu")
    losses = fit(model, prompt, z, targets, opt, 25)
    assert losses[-1] < losses[0] - 0.5, losses


# --- sampling ----------------------------------------------------------------------------------

def uncached_sample(model, prefix, n, temperature, generator):
    """Reference: recompute the whole sequence for every new token."""
    seq, out = prefix, []
    for _ in range(n):
        logits = model(seq)[:, -1].float()
        tok = draw((logits / temperature).softmax(-1), generator)
        out.append(tok)
        seq = torch.cat([seq, model.embed(tok[:, None])], 1)
    return torch.stack(out, 1).tolist()


def test_cached_sampling_equals_uncached(tiny_lm):
    model, _ = tiny_lm
    P = torch.randn(3, 4, model.cfg.d_model) * 0.05
    cached = sample(model, P, 12, temperature=0.8, generator=torch.Generator().manual_seed(5))
    uncached = uncached_sample(model, P, 12, 0.8, torch.Generator().manual_seed(5))
    assert cached == uncached


def test_sampling_is_deterministic_with_a_seed(tiny_lm):
    model, _ = tiny_lm
    P = torch.randn(4, 4, model.cfg.d_model) * 0.05
    run = lambda s: sample(model, P, 10, generator=torch.Generator().manual_seed(s))
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_top_k_one_and_tiny_top_p_are_greedy(tiny_lm):
    model, _ = tiny_lm
    P = torch.randn(2, 4, model.cfg.d_model) * 0.05
    greedy = sample(model, P, 8, temperature=0)
    assert sample(model, P, 8, top_k=1, generator=torch.Generator().manual_seed(0)) == greedy
    assert sample(model, P, 8, top_p=1e-6, generator=torch.Generator().manual_seed(0)) == greedy


def test_filter_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    probs = logits.softmax(-1)[0]          # 0.64, 0.24, 0.09, 0.03 in sorted order
    kept = ~torch.isinf(filter_logits(logits, top_p=0.8))
    assert kept.tolist() == [[False, True, True, False]] and probs[1] < 0.8 < probs[1] + probs[2]


def reference_top_p(logits, top_p):
    """The textbook nucleus: sort everything, keep tokens while the mass above them is < top_p."""
    sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
    p = sorted_logits.softmax(-1)
    drop = p.cumsum(-1) - p >= top_p
    return logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.99])
def test_top_p_from_a_growing_top_k_equals_the_full_sort(top_p):
    g = torch.Generator().manual_seed(0)
    # peaked rows (nucleus in the first top-256) and nearly flat ones (the top-k must grow past 2048)
    logits = torch.cat([torch.randn(6, 5000, generator=g) * 4, torch.randn(6, 5000, generator=g) * 0.05])
    fast, ref = filter_logits(logits, top_p=top_p), reference_top_p(logits, top_p)
    assert torch.equal(torch.isinf(fast), torch.isinf(ref))
    if top_p >= 0.5:                                           # the flat rows did need the growth
        assert (~torch.isinf(fast[6:])).sum(-1).min() > 256


def test_draw_follows_the_distribution_and_skips_impossible_tokens():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0]]).expand(40_000, 5)
    toks = draw(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(toks, minlength=5).float() / len(toks)
    assert freq[1] == 0 and freq[4] == 0
    assert torch.allclose(freq, probs[0], atol=0.01), freq
    # unnormalized rows and a row whose only mass is on its last token
    assert draw(torch.tensor([[0.0, 0.0, 3.0], [2.0, 0.0, 0.0]])).tolist() == [2, 0]


def test_each_row_stops_at_its_own_eos(tiny_lm):
    model, _ = tiny_lm
    P = torch.randn(2, 4, model.cfg.d_model) * 0.05
    free = sample(model, P, 10, temperature=0)
    # make the 4th greedy token of row 0 the "EOS": row 0 must stop there, row 1 where it first meets it
    eos = free[0][3]
    stopped = sample(model, P, 10, temperature=0, eos_id=eos)
    for row, full in zip(stopped, free):
        assert row == (full[: full.index(eos)] if eos in full else full)
    assert len(stopped[0]) <= 3


# --- train.py and generate.py ------------------------------------------------------------------

@pytest.fixture
def tiny_data(tmp_path):
    path = tmp_path / "questions.jsonl"
    data.write_jsonl(path, [{"question": t} for t in TEXTS])
    return path


def tiny_config(tiny_backbone, tiny_data, out, **kw):
    from softsrv import TrainConfig
    base = dict(param="mc", prompt_len=4, hidden=16, steps=6, lr=1e-2, warmup=2, batch_size=4, max_tokens=32,
                data=str(tiny_data), field="question", n_heldout=4, model=str(tiny_backbone),
                embed_model=str(tiny_backbone), out=str(out), eval_every=3, dtype="fp32")
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("param", ["np", "mp", "mc"])
def test_resumed_training_is_bit_identical(param, tiny_backbone, tiny_data, tmp_path, monkeypatch):
    import softsrv as train_module
    kw = dict(param=param, mp_decay=3.0)          # MP's decayed parameter group must resume too
    train_module.train(tiny_config(tiny_backbone, tiny_data, tmp_path / "a", **kw), show_samples=0)

    real_save = train_module.save_checkpoint
    def save_then_die(out, prompt, record, step, opt):   # the process is killed right after step 3's save
        real_save(out, prompt, record, step, opt)
        if step == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(tiny_config(tiny_backbone, tiny_data, tmp_path / "b", **kw), show_samples=0)
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    assert load_checkpoint(tmp_path / "b")[1]["step"] == 3
    train_module.train(tiny_config(tiny_backbone, tiny_data, tmp_path / "b", **kw), resume=True,
                       show_samples=0)

    a, rec_a = load_checkpoint(tmp_path / "a")
    b, rec_b = load_checkpoint(tmp_path / "b")
    assert rec_a["step"] == rec_b["step"] == 6
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert rec_a["history"] == rec_b["history"]


def test_resume_refuses_other_settings(tiny_backbone, tiny_data, tmp_path):
    from softsrv import train
    train(tiny_config(tiny_backbone, tiny_data, tmp_path / "a", steps=2), show_samples=0)
    with pytest.raises(ValueError, match="different settings.*lr"):
        train(tiny_config(tiny_backbone, tiny_data, tmp_path / "a", steps=4, lr=0.5), resume=True, show_samples=0)
    # a checkpoint written before an option existed resumes with that option's default
    cfg_file = tmp_path / "a" / "config.json"
    rec = json.loads(cfg_file.read_text())
    del rec["config"]["mp_decay"]
    cfg_file.write_text(json.dumps(rec))
    train(tiny_config(tiny_backbone, tiny_data, tmp_path / "a", steps=3), resume=True, show_samples=0)
    assert load_checkpoint(tmp_path / "a")[1]["step"] == 3
    import shutil                                       # a moved checkpoint folder still resumes
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    train(tiny_config(tiny_backbone, tiny_data, tmp_path / "moved", steps=4), resume=True, show_samples=0)
    assert load_checkpoint(tmp_path / "moved")[1]["step"] == 4
    with pytest.raises(ValueError, match="already holds a checkpoint; continue it with --resume"):
        train(tiny_config(tiny_backbone, tiny_data, tmp_path / "a", steps=3), show_samples=0)
    with pytest.raises(ValueError, match="holds no checkpoint to continue"):
        train(tiny_config(tiny_backbone, tiny_data, tmp_path / "empty", steps=2), resume=True, show_samples=0)


def test_training_lowers_heldout_loss_and_writes_a_checkpoint(tiny_backbone, tmp_path):
    """A random backbone cannot generalize to unseen text, so here every held-out text also has a
    twin in the training part: the held-out loss must then fall."""
    from softsrv import train
    tiny_data = tmp_path / "twice.jsonl"
    data.write_jsonl(tiny_data, [{"question": t} for t in TEXTS * 2])
    result = train(tiny_config(tiny_backbone, tiny_data, tmp_path / "ck", param="np", steps=12, eval_every=6),
                   show_samples=1)
    losses = [h["heldout_loss"] for h in result["history"]]
    assert [h["step"] for h in result["history"]] == [0, 6, 12]
    assert losses[-1] < losses[0]
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert files == ["config.json", "theta.safetensors", "train_state.safetensors"]
    rec = json.loads((tmp_path / "ck" / "config.json").read_text())
    for key in ("backbone", "encoder", "data_fingerprint", "step", "soft_prompt", "config"):
        assert key in rec
    assert rec["soft_prompt"]["kind"] == "np" and rec["soft_prompt"]["t"] == 4


def test_generate_writes_jsonl_and_completes_an_interrupted_file(tiny_backbone, tiny_data, tmp_path):
    from softsrv import generate
    from softsrv import train
    train(tiny_config(tiny_backbone, tiny_data, tmp_path / "ck", steps=2), show_samples=0)
    full = generate(str(tmp_path / "ck"), n=11, out=str(tmp_path / "full.jsonl"), batch_size=4, max_new_tokens=8)
    rows = data.read_jsonl(full)
    assert [r["index"] for r in rows] == list(range(11))
    n_train = json.loads((tmp_path / "ck" / "config.json").read_text())["n_train"]
    assert [r["context_id"] for r in rows[:n_train + 1]][-1] == rows[0]["context_id"]    # round-robin
    assert {"text", "context_id", "method", "seed"} <= set(rows[0]) and rows[0]["method"] == "SS_MC"

    # an interruption: the last batch lost, the one before it cut mid-line
    part = tmp_path / "part.jsonl"
    lines = full.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:6]) + lines[6][:10])
    generate(str(tmp_path / "ck"), n=11, out=str(part), batch_size=4, max_new_tokens=8)
    assert data.read_jsonl(part) == rows
    generate(str(tmp_path / "ck"), n=11, out=str(part), batch_size=4, max_new_tokens=8)   # nothing to do
    assert data.read_jsonl(part) == rows
    with pytest.raises(ValueError, match="other settings"):
        generate(str(tmp_path / "ck"), n=11, out=str(part), batch_size=4, max_new_tokens=8, temperature=0.5)


def test_cli_mistakes_are_one_line(tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    out = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--ckpt", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [f"error: {tmp_path}: not a SoftSRV checkpoint "
                                               f"(no config.json; train one with train.py --out {tmp_path})"]
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", "nonesuch", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode != 0 and out.stderr.strip().splitlines()[-1].startswith("error: unknown dataset 'nonesuch'")


def test_mp_decay_follows_the_preset_and_is_checked(capsys):
    from train import parse_args
    assert parse_args(["--param", "mp"])[0].mp_decay == 3.0
    assert parse_args(["--param", "mp", "--preset", "paper"])[0].mp_decay == 0.0    # Eq. 2 as published
    assert parse_args(["--param", "mp", "--mp-decay", "1"])[0].mp_decay == 1.0
    assert parse_args(["--param", "np"])[0].mp_decay == 0.0          # only MP has deviations to decay
    with pytest.raises(SystemExit):
        parse_args(["--mp-decay", "-1"])
    assert "argument --mp-decay: must be at least 0" in capsys.readouterr().err


def test_checkpoint_of_another_layout_is_a_one_line_error(tiny_lm, z, tmp_path):
    from softsrv import save_checkpoint
    model, _ = tiny_lm
    prompt = build_soft_prompt("np", model, z.shape[1], t=4)
    save_checkpoint(tmp_path, prompt, {"config": {}, "method": "SS_NP", "data_fingerprint": ""}, step=1)
    rec = json.loads((tmp_path / "config.json").read_text())
    rec["soft_prompt"].update(kind="mp", k=2)          # e.g. θ saved by an older SS_MP layout
    (tmp_path / "config.json").write_text(json.dumps(rec))
    with pytest.raises(ValueError, match="does not match MP with t=4 .*Missing key"):
        load_checkpoint(tmp_path)
