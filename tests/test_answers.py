"""answers.py: the gates that keep only answers a student can learn from (unfinished, looping,
task checks), self-consistency, few-shot prompts, BoolQ labels by probability."""
import pytest
import torch

import answers
import data
from weights import load_model, load_tokenizer


def test_loop_detection():
    looping = "So he walks 15 x 2 = 30 miles. " + "15 x 2 = 30 miles. " * 7
    assert answers.loops(looping)
    sound = ("Natalia sold 48/2 = 24 clips in May. Natalia sold 48 + 24 = 72 clips altogether in April "
             "and May. #### 72")
    assert not answers.loops(sound)
    # the same 8 words twice is not yet a loop; three times is
    span = "one two three four five six seven eight"
    assert not answers.loops(f"{span} and then {span}")
    assert answers.loops(f"{span} x {span} y {span}")


@pytest.mark.parametrize("task, text, finished, why", [
    ("gsm8k", "He has 3 + 4 = 7 apples.\n#### 7", True, None),
    ("gsm8k", "He has 3 + 4 = 7 apples and then", False, "unfinished"),
    ("gsm8k", "He has some apples, no idea how many.", True, "no_final_answer"),
    ("gsm8k", "15 x 2 = 30 miles. " * 8, True, "loop"),
    ("gsm8k", "   ", True, "empty"),
    ("mbpp", "def add(a, b):\n    return a + b", True, None),
    ("mbpp", "```python\ndef add(a, b):\n    return a + b\n```", True, None),
    ("mbpp", "The answer is to add them.", True, "no_function"),
    ("mbpp", "def add(a, b:\n    return", True, "no_function"),
])
def test_gate(task, text, finished, why):
    assert answers.gate(task, answers.strip_fences(text) if task == "mbpp" else text, finished) == why


def test_majority_needs_more_than_half():
    assert answers.majority([3.0, 3.0, 5.0]) == (3.0, pytest.approx(2 / 3))
    assert answers.majority([3.0, 5.0, None, None]) == (None, 0.25)
    assert answers.majority([3.0, 3.0, 5.0, 5.0]) == (None, 0.5)
    assert answers.majority([None, None]) == (None, 0.0)


def test_split_example_round_trips_the_example_format():
    text = answers.EXAMPLE.format(q="What is 2+2?", a="2+2 = 4\n#### 4")
    assert answers.split_example(text) == ("What is 2+2?", "2+2 = 4\n#### 4")
    assert answers.split_example("Question: no answer part here") is None


@pytest.fixture(scope="module")
def tiny(tiny_backbone):
    return load_model(tiny_backbone), load_tokenizer(tiny_backbone)


def test_unfinished_and_looping_answers_are_dropped(tiny, monkeypatch):
    """What the answerer writes decides: a text that hits the cap is `unfinished`, one that repeats
    itself `loop`, and only the sound one is kept."""
    model, tok = tiny
    texts = {"q1": "It is 3 + 4 = 7.\n#### 7", "q2": "It is 3 + 4 = 7 and", "q3": "7 apples. " * 12}
    capped = {"q2"}

    def fake_generate(model, prompts, max_new, eos_id, **kw):
        out, fin = [], []
        for p in prompts:
            q = next(k for k in texts if k in tok.decode(p))
            ids = tok.encode(texts[q])
            out.append(ids + [0] * (max_new - len(ids)) if q in capped else ids)
            fin.append(q not in capped)
        return out, fin
    monkeypatch.setattr(answers, "generate_from_ids", fake_generate)
    tok_decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda ids: tok_decode([i for i in ids if i != 0]))
    a = answers.Answerer(model, tok, "gsm8k", "as-is", "{q}", [], max_tokens=200)
    recs = a.answer(["q1", "q2", "q3"], seed=0)
    assert [r["drop"] for r in recs] == [None, "unfinished", "loop"]
    assert recs[0]["answer"] == texts["q1"] and recs[0]["finished"]


def test_self_consistency_keeps_a_majority_chain(tiny, monkeypatch):
    model, tok = tiny
    chains = iter(["a\n#### 5", "b\n#### 6", "c\n#### 6",      # question 1: 6 wins, 2 of 3
                   "a\n#### 1", "b\n#### 2", "c\n#### 3"])     # question 2: no majority
    monkeypatch.setattr(answers, "generate_from_ids", lambda model, prompts, *a, **k: (
        [tok.encode(next(chains)) for _ in prompts], [True] * len(prompts)))
    a = answers.Answerer(model, tok, "gsm8k", "as-is", "{q}", [], max_tokens=40, temperature=0.7, samples=3)
    r1, r2 = a.answer(["first", "second"], seed=0)
    assert r1["drop"] is None and r1["answer"] == "b\n#### 6" and r1["agreement"] == pytest.approx(2 / 3)
    assert r2["drop"] == "no_majority"


def test_fewshot_prompt_is_the_same_for_every_method(tiny):
    model, tok = tiny
    shots = [data.Example("What is 1+1?", "s1", "1+1=<<1+1=2>>2\n#### 2")]
    fs = answers.Answerer(model, tok, "gsm8k", "fewshot", "ignored {q}", shots, max_tokens=8)
    text = tok.decode(fs.prompt_ids("What is 2+2?"))
    assert text == "Question: What is 1+1?\nAnswer: 1+1=2\n#### 2\n\nQuestion: What is 2+2?\nAnswer:"


def test_boolq_label_follows_the_larger_probability(tiny):
    """BoolQ labels come from the answerer's log-probabilities of true vs false, not free text."""
    model, tok = tiny
    a = answers.Answerer(model, tok, "boolq", "fewshot", "{q}", [], max_tokens=8)
    qs = ["PASSAGE: The sky is blue.\nQUESTION: is the sky blue", "PASSAGE: Cats bark.\nQUESTION: do cats bark"]
    recs = a.answer(qs, seed=0)
    for q, r in zip(qs, recs):
        ctx = tok.encode(f"Question: {q}\nAnswer:")
        with torch.no_grad():
            logp = model(model.embed(torch.tensor([ctx])))[0, -1].float().log_softmax(-1)
        t, f = tok.encode(" true"), tok.encode(" false")
        if len(t) == len(f) == 1:
            want = "true" if logp[t[0]] > logp[f[0]] else "false"
            assert r["answer"] == want
        assert r["answer"] in ("true", "false") and r["drop"] is None
        assert set(r["logprobs"]) == {"true", "false"}


def test_sampled_answers_do_not_depend_on_the_chunk(tiny):
    """Each (question, sample) draws from its own generator, so a resumed or torchrun-dealt answer
    step, which chunks the questions differently, writes the same answers."""
    model, tok = tiny
    a = answers.Answerer(model, tok, "gsm8k", "fewshot", "{q}", [data.Example("1+1?", "s", "2\n#### 2")],
                         max_tokens=6, temperature=1.0, samples=2, batch_size=3)
    qs = [f"What is {i} + 1?" for i in range(4)]
    whole = a.answer(qs, seed=5, indices=[10, 11, 12, 13])
    parts = a.answer(qs[:1], seed=5, indices=[10]) + a.answer(qs[1:], seed=5, indices=[11, 12, 13])
    assert [r["finals"] for r in whole] == [r["finals"] for r in parts]
    assert [r["answer"] for r in whole] == [r["answer"] for r in parts]
