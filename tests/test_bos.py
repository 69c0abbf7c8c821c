"""BOS where the model expects one (issue 24 §3): Gemma models text far worse without its BOS, so
every text prompt, E(x) and SoftSRV's [BOS; P_θ(z); x] start with it when the tokenizer says
`add_bos`, and nothing changes for a tokenizer that does not (SmolLM2's byte-level BPE).

The Gemma side is a tiny random Gemma 3 with a small SentencePiece-style vocabulary (test_gemma's),
whose GGUF metadata says add_bos_token, and a Gemma-like chat template that renders {{ bos_token }}."""
import copy
import json
import types

import pytest
import torch
import torch.nn.functional as F

import data
import tasks
from conftest import QUESTIONS, save_hf
from test_gemma import gemma3, small_sentencepiece
from tokenizer import Tokenizer, qa_prompt_ids
from weights import load_model, load_tokenizer

GEMMA_CHAT = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
              "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    folder = save_hf(gemma3(), tmp_path_factory.mktemp("tiny_gemma_bos"))
    tj, tc = small_sentencepiece()
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    return folder


@pytest.fixture(scope="module")
def backbones(gemma_dir, tiny_backbone):
    """name -> (model, tokenizer): one that wants a BOS, one that does not."""
    return {"gemma": (load_model(gemma_dir), load_tokenizer(gemma_dir)),
            "byte": (load_model(tiny_backbone), load_tokenizer(tiny_backbone))}


def test_every_tokenizer_says_whether_it_wants_bos(backbones):
    gemma, byte = backbones["gemma"][1], backbones["byte"][1]
    assert gemma.add_bos and gemma.bos_id == 2
    assert type(byte) is Tokenizer and byte.add_bos is False        # the base class answers too
    ids = gemma.encode("the theine")
    assert gemma.with_bos(ids) == [2] + ids
    assert gemma.with_bos(gemma.with_bos(ids)) == [2] + ids          # never two
    assert byte.with_bos(byte.encode("the theine")) == byte.encode("the theine")


def assert_starts(tok, prompts, start):
    """Exactly one BOS first when the tokenizer wants it (then the text), none otherwise."""
    assert prompts
    for p in prompts:
        if tok.add_bos:
            assert p[0] == tok.bos_id and p[1] != tok.bos_id, p[:4]
            p = p[1:]
        assert tok.decode(p).startswith(start), tok.decode(p[:8])


def capture(monkeypatch):
    """Fake the model calls of eval.py, keeping the token ids they are given."""
    seen = {}

    def generate(model, prompts, *a, **k):
        # a shared k-shot prefix is prefilled once; each prompt is the prefix and its own rest
        seen["prompts"] = [list(k.get("prefix") or []) + list(p) for p in prompts]
        return [[] for _ in prompts]

    def choices(model, ctxs, choices, *a, **k):
        seen["prompts"] = ctxs
        return torch.zeros(len(ctxs), len(choices))

    def nll(model, seqs, *a, **k):
        seen["prompts"] = [c for c, _ in seqs]
        seen["seqs"] = seqs
        return [0.0] * len(seqs)
    monkeypatch.setattr(tasks, "generate_from_ids", generate)
    monkeypatch.setattr(tasks, "choice_logprobs", choices)
    monkeypatch.setattr(tasks, "continuation_nll", nll)
    monkeypatch.setattr(tasks.sandbox, "run_tests_many", lambda jobs, **k: [(False, "")] * len(jobs))
    return seen


@pytest.mark.parametrize("chat", [True, False])
def test_eval_prompts_start_with_one_bos_when_the_model_wants_it(backbones, monkeypatch, chat):
    """The k-shot and 0-shot prompts, the chat runners, the answer-loss and choice contexts; with the
    chat template (Gemma's renders the BOS itself: still one) and the plain "Question:" form."""
    seen = capture(monkeypatch)
    shot = data.Example("What is 1+1?", "s", "1+1=2\n#### 2", meta={"test_list": ["assert f(1) == 1"]})
    yes = data.Example("is water wet", "b", "true", meta={"passage": "Water is wet", "question": "is water wet"})
    item = data.Example("A train goes 60 miles in 2 hours. How fast is it?", "i", "30\n#### 30",
                        meta={"test_list": ["assert f(2) == 2"], "passage": "The sky is blue", "question": "is it blue",
                              "aliases": ["30"], "task_id": "t", "test": "", "entry_point": "f"})
    for name, (_, tok) in backbones.items():
        tok = copy.copy(tok)
        tok.chat_template = (GEMMA_CHAT if name == "gemma" else tok.chat_template) if chat else None
        turn = "" if not chat else "<start_of_turn>user" if name == "gemma" else "<|im_start|>system"
        qa_start = turn or "Question:"
        runs = [(lambda: tasks.run_gsm8k(None, tok, [item], [shot], 4), "Question: What is 1+1?"),
                (lambda: tasks.run_mbpp(None, tok, [item], [shot], 4), "You are an expert"),
                (lambda: tasks.run_humaneval(None, tok, [item], [], 4), "A train"),
                (lambda: tasks.run_boolq(None, tok, [item], [yes], 4), "Water is wet"),
                (lambda: tasks.run_triviaqa(None, tok, [item], [], 4), "Question: A train"),
                (lambda: tasks.chat_answers(None, tok, [item], 8, 4), qa_start),
                (lambda: tasks.answer_loss(None, tok, [(item.text, "30")], progress=False), qa_start)]
        if chat:    # (the small Gemma vocabulary spells " True" and " False" alike at first)
            runs.append((lambda: tasks.run_boolq_chat(None, tok, [item], 4), qa_start))
        for run, start in runs:
            run()
            assert_starts(tok, seen["prompts"], start)
        assert_starts(tok, [qa_prompt_ids(tok, item.text)], qa_start)
        # cut to fit max_tokens from the left, the prompt keeps its BOS
        tasks.answer_loss(None, tok, [(item.text * 20, "30")], max_tokens=40, progress=False)
        (p, a), = seen["seqs"]
        assert len(p) + len(a) == 40 and (p[0] == tok.bos_id) == tok.add_bos and p[1] != tok.bos_id


def test_answer_step_and_template_prompts_start_with_bos(backbones, monkeypatch):
    """answers.py's few-shot prompt and pipeline._complete's plain-text continuation."""
    import answers
    import pipeline as pl
    seen = {}
    fake = lambda model, prompts, *a, **k: seen.update(prompts=prompts) or [[] for _ in prompts]
    monkeypatch.setattr(pl, "generate_from_ids", fake)
    shots = [data.Example("What is 1+1?", "s", "1+1=2\n#### 2")]
    cfg = types.SimpleNamespace(question_tokens=8, pt_temperature=1.0, pt_top_p=1.0, batch_size=4)
    for _, tok in backbones.values():
        a = answers.Answerer(None, tok, "gsm8k", "fewshot", "{q}", shots, max_tokens=8)
        assert_starts(tok, [a.prompt_ids("What is 2+2?")], "Question: What is 1+1?")
        pl._complete(None, tok, ["Write a question about apples."], cfg, seed=0, chat=False)
        assert_starts(tok, seen["prompts"], "Write a question")


def test_context_encoder_reads_x_after_bos_and_averages_x_only(backbones):
    """E(x) = mean of the hidden states at x's tokens, read after the BOS when the encoder wants one;
    the BOS position itself is not averaged (see ContextEncoder); padding changes nothing."""
    from softsrv import ContextEncoder
    for _, (model, tok) in backbones.items():
        enc = ContextEncoder(model, tok, batch_size=4)
        ids = tok.encode(QUESTIONS[0])
        bos = [tok.bos_id] if tok.add_bos else []
        with torch.no_grad():
            h = model.hidden_states(model.embed(torch.tensor([bos + ids])))[0]
        want = h[len(bos):].mean(0)
        assert torch.allclose(enc([QUESTIONS[0]])[0], want, atol=1e-5)
        assert torch.allclose(enc([QUESTIONS[0], QUESTIONS[1] * 3])[0], want, atol=1e-5)


def hand_loss(model, tok, P, token_lists):
    """Σ CE / Σ tokens of x and its EOS given [BOS; P; x] (BOS only when the model wants it), one
    sequence at a time."""
    total, count = 0.0, 0
    for p, ids in zip(P, token_lists):
        x = torch.tensor(ids + [tok.eos_id])
        bos = [model.embed(torch.tensor([[tok.bos_id]]))[0]] if tok.add_bos else []
        prefix = torch.cat(bos + [p.to(model.dtype)])
        h = model.hidden_states(torch.cat([prefix, model.embed(x[None, :-1])[0]])[None])[0]
        logits = model.logits(h[len(prefix) - 1:]).float()
        total += F.cross_entropy(logits, x, reduction="sum").item()
        count += len(x)
    return total / count


def test_softsrv_loss_and_heldout_loss_read_bos_then_prompt_then_x(backbones):
    """The loss of x given [BOS; P; x] on Gemma ([P; x] otherwise), counted on x and its EOS only,
    through softsrv_loss and through train.py's held-out loss."""
    from softsrv import pad_targets, prepend_bos, softsrv_loss
    from softsrv import heldout_loss
    for _, (model, tok) in backbones.items():
        g = torch.Generator().manual_seed(0)
        P = torch.randn(3, 2, model.cfg.d_model, generator=g)
        lists = [tok.encode(q) for q in QUESTIONS[:3]]
        want = hand_loss(model, tok, P, lists)
        with torch.no_grad():
            prefix = prepend_bos(model, tok, P)
            assert prefix.shape[1] == 2 + tok.add_bos
            got = softsrv_loss(model, prefix, pad_targets(lists, tok.eos_id, 64, "cpu")).item()
            cfg = types.SimpleNamespace(batch_size=1, max_tokens=64)
            held, _ = heldout_loss(model, tok, lambda z: P[z[:, 0].long()], torch.arange(3.0)[:, None], lists,
                                   cfg, n_bytes=100)
        assert got == pytest.approx(want, rel=1e-5) and held == pytest.approx(want, rel=1e-5)


def test_training_and_sampling_on_gemma_put_bos_before_the_soft_prompt(gemma_dir, backbones, tmp_path,
                                                                        monkeypatch):
    """train.py's training loss, held-out loss and end-of-run samples, and generate.py's samples,
    all feed H the BOS embedding first, then the t soft tokens."""
    import softsrv as tr
    model, tok = backbones["gemma"]
    bos = model.embed(torch.tensor([[tok.bos_id]]))[0, 0]
    prefixes = []

    def spy(fn):
        return lambda backbone, prefix, *a, **k: prefixes.append(prefix.detach()) or fn(backbone, prefix, *a, **k)
    monkeypatch.setattr(tr, "softsrv_loss", spy(tr.softsrv_loss))
    monkeypatch.setattr(tr, "sample", spy(tr.sample))
    path = tmp_path / "q.jsonl"
    data.write_jsonl(path, [{"question": q} for q in QUESTIONS])
    cfg = tr.TrainConfig(param="mc", prompt_len=3, hidden=8, steps=2, lr=1e-2, warmup=1, batch_size=4,
                         max_tokens=16, data=str(path), field="question", n_heldout=4, model=str(gemma_dir),
                         embed_model=str(gemma_dir), out=str(tmp_path / "ck"), eval_every=2, dtype="fp32")
    tr.train(cfg, show_samples=1)
    n_train = len(prefixes)
    assert n_train == 2 + 2 * 1 + 1           # 2 steps, held-out loss at steps 0 and 2 (1 batch), samples
    tr.generate(str(tmp_path / "ck"), n=2, out=str(tmp_path / "g.jsonl"), batch_size=2, max_new_tokens=4)
    assert len(prefixes) == n_train + 1
    for p in prefixes:
        assert p.shape[1] == 1 + 3 and torch.equal(p[:, 0], bos.expand(len(p), -1).to(p.dtype))
