"""student.py (finetune.py): packing keeps examples apart, loss only on answer tokens, checkpoints, resume."""
import json

import pytest
import torch
import torch.nn.functional as F

import data
import student as ft
from tokenizer import qa_answer_ids, qa_prompt_ids
from weights import load_model, load_tokenizer

PAIRS = [("What is 2+2?", "4"), ("Name a color.", "Blue, like the sky."),
         ("How many legs has a cat?", "A cat has four legs."), ("Say hi.", "Hi!"),
         ("What is 10 - 3?", "10 - 3 = 7\n#### 7"), ("Spell cat.", "C-A-T")]


@pytest.fixture(scope="module")
def tiny(tiny_backbone):
    return load_model(tiny_backbone), load_tokenizer(tiny_backbone)


def write_pairs(path, pairs=PAIRS):
    data.write_jsonl(path, [{"question": q, "answer": a} for q, a in pairs])
    return str(path)


def test_packing_first_fit_covers_every_example_once():
    ex = [([0] * n, 1) for n in (5, 9, 3, 7, 2, 8)]
    rows = ft.pack(ex, 10, seed=0)
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum(len(ex[i][0]) for i in r) <= 10 for r in rows)


def test_packed_loss_equals_each_example_alone(tiny):
    """Two examples packed into one row (segment_ids) give the same answer-token loss as each alone:
    attention stays inside each example, positions restart, prompt tokens carry no loss."""
    model, tok = tiny
    examples = ft.encode_pairs(tok, PAIRS[:2], 256)
    ids, labels, seg = ft.collate(examples, [[0, 1]], 256, "cpu")
    with torch.no_grad():
        packed, n = ft.packed_loss(model, ids, labels, seg)
        alone, n_alone = 0.0, 0
        for (q, a) in PAIRS[:2]:
            p, ans = qa_prompt_ids(tok, q), qa_answer_ids(tok, a)
            x = torch.tensor([p + ans])
            logits = model(model.embed(x[:, :-1]))[0, len(p) - 1:].float()
            alone += F.cross_entropy(logits, torch.tensor(ans), reduction="sum").item()
            n_alone += len(ans)
    assert n == n_alone
    assert packed.item() == pytest.approx(alone, rel=1e-5)


def test_finetune_lowers_loss_and_checkpoints_load(tiny_backbone, tmp_path):
    cfg = ft.FinetuneConfig(data=write_pairs(tmp_path / "pairs.jsonl"), out=str(tmp_path / "ft"),
                            model=str(tiny_backbone), seq_len=128, batch_size=2, micro_batch=1, lr=3e-3,
                            warmup=1, epochs=4, n_checkpoints=2, dtype="fp32")
    ckpts = ft.finetune(cfg, progress=False)
    assert [s for s, _ in ckpts] == ft.checkpoint_steps(cfg) and ckpts[-1][0] == cfg.steps
    hist = json.loads((ckpts[-1][1] / ft.STATE_JSON).read_text())["history"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    # only the newest checkpoint keeps the optimizer state; every one loads as a model
    assert [(p / ft.CKPT_STATE).exists() for _, p in ckpts] == [False] * (len(ckpts) - 1) + [True]
    tuned, base = load_model(ckpts[-1][1]), load_model(tiny_backbone)
    assert not torch.equal(tuned.tok_emb.weight, base.tok_emb.weight)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpts[-1][1])
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, tuned(tuned.embed(x)), atol=1e-4)


def test_interrupted_finetune_resumes_to_the_same_weights(tiny_backbone, tmp_path, monkeypatch):
    kw = dict(model=str(tiny_backbone), seq_len=128, batch_size=2, micro_batch=2, lr=3e-3, warmup=1,
              epochs=2, save_at=[1, 2], dtype="fp32")
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    full = ft.finetune(ft.FinetuneConfig(data=pairs, out=str(tmp_path / "a"), **kw), progress=False)

    real_save = ft.save_state

    def save_then_die(*a, **k):
        real_save(*a, **k)
        raise KeyboardInterrupt             # the process dies right after the first checkpoint
    monkeypatch.setattr(ft, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(ft.FinetuneConfig(data=pairs, out=str(tmp_path / "b"), **kw), progress=False)
    monkeypatch.setattr(ft, "save_state", real_save)
    resumed = ft.finetune(ft.FinetuneConfig(data=pairs, out=str(tmp_path / "b"), **kw), progress=False)
    assert [s for s, _ in resumed] == [s for s, _ in full]
    a, b = load_model(full[-1][1]).state_dict(), load_model(resumed[-1][1]).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_other_settings_and_bad_data_are_refused(tiny_backbone, tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    kw = dict(data=pairs, out=str(tmp_path / "ft"), model=str(tiny_backbone), seq_len=128, batch_size=2,
              epochs=1, n_checkpoints=1, dtype="fp32")
    ft.finetune(ft.FinetuneConfig(**kw), progress=False)
    with pytest.raises(ValueError, match="other settings.*lr"):
        ft.finetune(ft.FinetuneConfig(**{**kw, "lr": 1.0}), progress=False)
    bad = tmp_path / "bad.jsonl"
    data.write_jsonl(bad, [{"question": "q", "answer": "a"}, {"question": "q2"}])
    with pytest.raises(ValueError, match="bad.jsonl: record 2 needs"):
        ft.load_pairs(str(bad))


def test_a_prompt_longer_than_seq_len_counts_no_answer_tokens(tiny):
    """A pair cut inside its prompt has no answer tokens: its count is 0, never negative, so it adds
    nothing to the loss divisor (the old count kept len(prompt) after the cut)."""
    _, tok = tiny
    long_q = "word " * 200
    (ids, n_prompt), (ids2, n_prompt2) = ft.encode_pairs(tok, [(long_q, "short"), ("Hi?", "Hello.")], 64)
    assert len(ids) == 64 and n_prompt == 64 and len(ids) - n_prompt == 0
    assert len(ids2) - n_prompt2 == len(qa_answer_ids(tok, "Hello."))
    _, labels, _ = ft.collate([(ids, n_prompt), (ids2, n_prompt2)], [[0], [1]], 64, "cpu")
    assert (labels[0] != -100).sum() == 0 and (labels[1] != -100).sum() == len(ids2) - n_prompt2


def test_fixed_steps_override_epochs(tiny_backbone, tmp_path):
    cfg = ft.FinetuneConfig(data=write_pairs(tmp_path / "pairs.jsonl"), out=str(tmp_path / "ft"),
                            model=str(tiny_backbone), seq_len=64, batch_size=2, micro_batch=2, lr=1e-3,
                            warmup=1, epochs=1, fixed_steps=5, n_checkpoints=1, dtype="fp32")
    ckpts = ft.finetune(cfg, progress=False)
    assert cfg.steps == 5 and [s for s, _ in ckpts] == [5]
