"""eval.py: answer extraction, the qa format, answer loss, BoolQ scoring, batched generation, the CLI."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import data
import eval as ev
import tasks
from conftest import has_package
from weights import load_model, load_tokenizer
from sampling import cut_at, generate_from_ids, sample, stop_on
from tokenizer import qa_answer_ids, qa_prompt_ids


@pytest.fixture(scope="module")
def tiny(tiny_backbone):
    return load_model(tiny_backbone), load_tokenizer(tiny_backbone)


# --- GSM8K answer extraction -------------------------------------------------------------------

@pytest.mark.parametrize("completion, expected", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", 18),
    ("#### 1,234", 1234),
    ("The total is $1,234.50.", 1234.5),
    ("So he has 5.00 dollars left", 5),
    ("The temperature drops to -7 degrees. That is the answer.", -7),
    ("It costs -$3 in the end", -3),
    ("10 - 3 = 7 apples remain", 7),
    ("#### 42\n\nNote: 5 more questions follow", 42),      # the #### answer wins over trailing numbers
    ("#### none\nso it is 12", 12),                          # no number after ####: the last one
    ("I do not know.", None),
    ("", None),
    ("Answer: 3.", 3),
])
def test_gsm8k_extract(completion, expected):
    got = tasks.gsm8k_extract(completion)
    assert got == expected if expected is None else tasks._same_number(got, expected)


def test_gsm8k_reference_and_prompt():
    ex = data.Example("Q1?", "gsm8k/train/0", "2 + 2 = <<2+2=4>>4\n#### 1,004")
    assert tasks.gsm8k_reference(ex.answer) == 1004
    prompt = tasks.gsm8k_prompt([ex], "Q2?")
    assert prompt == "Question: Q1?\nAnswer: 2 + 2 = 4\n#### 1,004\n\nQuestion: Q2?\nAnswer:"


def test_normalize_answer_for_triviaqa():
    assert tasks.normalize_answer("The  Beatles!") == tasks.normalize_answer("beatles") == "beatles"
    assert tasks.normalize_answer("A Tale of Two Cities") == "tale of two cities"


# --- the qa format -----------------------------------------------------------------------------

def test_qa_format_round_trip_chat(tiny):
    _, tok = tiny
    assert tok.chat_template
    q, a = "What is 2+2?", "It is 4."
    ids = qa_prompt_ids(tok, q) + qa_answer_ids(tok, a)
    full = tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                   add_generation_prompt=False)
    assert ids[-1] == tok.eos_id
    assert tok.decode(ids) == full.rstrip("\n")        # the template's turn ends with EOS then "\n"
    assert tok.decode(qa_prompt_ids(tok, q)).endswith("assistant\n")


def test_qa_format_round_trip_plain(tiny):
    tok = copy.copy(tiny[1])
    tok.chat_template = None
    ids = qa_prompt_ids(tok, "What is 2+2?") + qa_answer_ids(tok, "4")
    assert tok.decode(ids[:-1]) == "Question: What is 2+2?\nAnswer: 4" and ids[-1] == tok.eos_id


# --- log-likelihoods ---------------------------------------------------------------------------

PAIRS = [("What is 2+2?", "4"), ("Name a colour.", "Blue, like the sky."),
         ("Tell me a long story about a fox.", "Once upon a time a fox lived in the woods near a river.")]


def test_answer_loss_equals_direct_computation(tiny):
    model, tok = tiny
    got = tasks.answer_loss(model, tok, PAIRS, batch_size=2, progress=False)
    total, count = 0.0, 0
    for (q, a), item in zip(PAIRS, got["per_item"]):
        p, ans = qa_prompt_ids(tok, q), qa_answer_ids(tok, a)
        logits = model(model.embed(torch.tensor([p + ans])))[0].float()
        ce = F.cross_entropy(logits[len(p) - 1:-1], torch.tensor(ans), reduction="sum").item()
        assert item["tokens"] == len(ans) and item["loss"] == pytest.approx(ce / len(ans), rel=1e-4)
        total, count = total + ce, count + len(ans)
    assert got["tokens"] == count and got["loss"] == pytest.approx(total / count, rel=1e-4)


def test_answer_loss_truncates_to_max_tokens(tiny):
    model, tok = tiny
    got = tasks.answer_loss(model, tok, PAIRS[2:], max_tokens=40, progress=False)
    p = qa_prompt_ids(tok, PAIRS[2][0])
    assert got["per_item"][0]["truncated"] and got["tokens"] == 40 - len(p)


def test_boolq_scoring_matches_direct_logits(tiny):
    model, tok = tiny
    items = data.load_examples("boolq", "dev", limit=3)
    records = tasks.run_boolq(model, tok, items, [], batch_size=2)
    yes, no = tok.encode(" yes"), tok.encode(" no")
    assert len(yes) == len(no) == 1
    for e, r in zip(items, records):
        logits = model(model.embed(torch.tensor([tok.encode(tasks.boolq_context(e))])))[0, -1].float()
        lp = logits.log_softmax(-1)
        assert r["logprobs"]["true"] == pytest.approx(lp[yes[0]].item(), abs=1e-4)
        assert r["logprobs"]["false"] == pytest.approx(lp[no[0]].item(), abs=1e-4)
        assert r["correct"] == (r["prediction"] == e.answer)
        assert r["prediction"] == ("true" if lp[yes[0]] > lp[no[0]] else "false")


def test_multi_token_choices_equal_continuation_nll(tiny):
    model, tok = tiny
    ctxs = [tok.encode("The sky is"), tok.encode("Grass is usually")]
    choices = [tok.encode(" blue today"), tok.encode(" green")]
    lp = tasks.choice_logprobs(model, ctxs, choices)
    for i, c in enumerate(ctxs):
        for j, ch in enumerate(choices):
            logits = model(model.embed(torch.tensor([c + ch])))[0].float()
            direct = logits[len(c) - 1:-1].log_softmax(-1)[torch.arange(len(ch)), torch.tensor(ch)].sum()
            assert lp[i, j].item() == pytest.approx(direct.item(), abs=1e-4)


# --- batched generation ------------------------------------------------------------------------

def test_generate_from_ids_equals_one_by_one_greedy(tiny):
    model, tok = tiny
    prompts = [tok.encode(t) for t in ["Hello", "A much longer prompt than the first one, with commas",
                                       "Middle-sized prompt here", "x"]]
    batched = generate_from_ids(model, prompts, 10, eos_id=None, batch_size=3)
    alone = [sample(model, model.embed(torch.tensor([p])), 10, temperature=0)[0] for p in prompts]
    assert batched == alone and all(len(b) == 10 for b in batched)


def test_stop_callback_stops_rows(tiny):
    model, tok = tiny
    prompts = [tok.encode("Hello"), tok.encode("Another prompt")]
    free = generate_from_ids(model, prompts, 12, eos_id=None)
    target = free[0][4]                             # row 0 must stop right after its 5th token
    stopped = generate_from_ids(model, prompts, 12, eos_id=None, stop=lambda ids: ids[-1] == target)
    for row, full in zip(stopped, free):
        assert row == (full[: full.index(target) + 1] if target in full else full)
    assert len(stopped[0]) <= 5


def test_stop_on_strings(tiny):
    _, tok = tiny
    stop = stop_on(tok, ["Question:"])
    assert stop(tok.encode("x = 3\n#### 3\n\nQuestion:")) and not stop(tok.encode("#### 3\n\n"))
    assert cut_at("#### 3\n\nQuestion: next", ["Question:"]) == "#### 3\n\n"


# --- the CLI -----------------------------------------------------------------------------------

def test_gsm8k_end_to_end(tiny_backbone, tmp_path, capsys):
    out = tmp_path / "gsm8k.json"
    summary = ev.main(["task", "gsm8k", "--model", str(tiny_backbone), "--limit", "4", "--shots", "2",
                       "--loss-limit", "4", "--out", str(out), "--dtype", "fp32"])
    written = json.loads(out.read_text())
    assert written["summary"] == summary
    assert summary["task"] == "gsm8k" and summary["n"] == 4 and summary["shots"] == 2
    assert summary["metric"] == "pass@1" and 0 <= summary["score"] <= 1
    assert summary["answer_loss"] > 5      # a random model: near log(49152) = 10.8 nats/token
    heldout = data.load_examples("gsm8k", "test", limit=4)
    assert [r["id"] for r in written["items"]] == [e.id for e in heldout]
    for r, e in zip(written["items"], heldout):
        assert r["reference"] == float(e.meta["short_answer"].replace(",", ""))
        assert "Question:" not in r["completion"] and r["answer_tokens"] > 0
        assert isinstance(r["chat_correct"], bool) and isinstance(r["chat_completion"], str)
    assert summary["chat_score"] == sum(r["chat_correct"] for r in written["items"]) / 4
    assert summary["answer_n"] == 4 and [a["id"] for a in written["answer_losses"]] == [e.id for e in heldout]
    assert "eval gsm8k: answer loss" in capsys.readouterr().out


def test_loss_only_and_triviaqa(tiny_backbone, tmp_path):
    items = data.load_examples("triviaqa", "validation")
    assert len(items) == 7993          # the fold's size in the package's dataset_info.json
    assert items[0].text == "Which Lloyd Webber musical premiered in the US on 10th December 1993?"
    assert items[0].answer == "Sunset Boulevard" and "Sunset Blvd" in items[0].meta["aliases"]
    out = tmp_path / "t.json"
    summary = ev.main(["task", "triviaqa", "--model", str(tiny_backbone), "--limit", "3", "--loss-only",
                       "--loss-limit", "3", "--out", str(out), "--dtype", "fp32"])
    assert summary["score"] is None and summary["n"] == 3 and summary["answer_loss"] > 5
    summary = ev.main(["task", "triviaqa", "--model", str(tiny_backbone), "--limit", "3",
                       "--loss-limit", "3", "--out", str(out), "--dtype", "fp32"])
    recs = json.loads(out.read_text())["items"]
    assert summary["score"] == 0.0 and all("\n" not in r["prediction"] for r in recs)
    assert "chat_score" not in summary                 # no chat variant: the student is not tuned on it


@pytest.mark.skipif(not has_package("sandbox"), reason="sandbox.py (task A) not merged yet")
def test_mbpp_end_to_end(tiny_backbone, tmp_path, monkeypatch):
    """A random model's code fails its tests; the reference code, put in as the completion, passes."""
    out = tmp_path / "mbpp.json"
    summary = ev.main(["task", "mbpp", "--model", str(tiny_backbone), "--limit", "2", "--shots", "1",
                       "--loss-limit", "2", "--out", str(out), "--dtype", "fp32"])
    assert summary["n"] == 2 and summary["score"] == 0.0 and summary["answer_loss"] > 0
    assert summary["chat_score"] == 0.0
    items = data.load_examples("mbpp", "test", limit=2)
    gold = {e.text: e.answer for e in items}
    monkeypatch.setattr(tasks, "generate_from_ids", lambda model, prompts, *a, **k: [
        model_tok.encode(next(c for q, c in gold.items() if q in model_tok.decode(p)) + "\n[DONE]")
        for p in prompts])
    model_tok = load_tokenizer(tiny_backbone)
    summary = ev.main(["task", "mbpp", "--model", str(tiny_backbone), "--limit", "2", "--shots", "0",
                       "--loss-limit", "2", "--out", str(out), "--dtype", "fp32"])
    assert summary["score"] == 1.0
    # the chat prompt holds the task's text too, so the chat answer is the same gold code followed by
    # "[DONE]": mbpp_code keeps its function and drops the rest, and the tests pass
    assert summary["chat_score"] == 1.0


@pytest.mark.parametrize("argv, message", [
    (["task", "nosuchtask"], "invalid choice"),
    (["task", "gsm8k", "--model", "/nonexistent/model", "--limit", "1"], "error: /nonexistent/model"),
    (["task", "humaneval", "--shots", "2"], "error: --shots 2: humaneval has no train fold"),
    (["task", "gsm8k", "--limit", "0"], "error: argument --limit: must be at least 1, got 0"),
])
def test_bad_input_is_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(argv)
    err = str(e.value.code) if e.value.code not in (None, 2) else capsys.readouterr().err
    assert message in err.strip().splitlines()[-1]           # argparse prints its usage first
    assert "Traceback" not in err and (e.value.code == 2 or len(err.strip().splitlines()) == 1)


def test_mauve_subcommand_delegates(monkeypatch):
    import types
    seen = []
    monkeypatch.setattr(ev, "mauve", types.SimpleNamespace(cli=lambda argv: seen.append(argv) or 0.5))
    assert ev.main(["mauve", "--gen", "a.jsonl", "--ref", "gsm8k:test", "--buckets", "32"]) == 0.5
    assert seen == [["--gen", "a.jsonl", "--ref", "gsm8k:test", "--buckets", "32"]]


# --- the student's own chat format, BoolQ's prior, the answer loss on all items (issue 26) ---------

def test_gsm8k_chat_score_counts_the_chat_answer(tiny_backbone, tmp_path, monkeypatch):
    """0-shot chat pass@1: the prompt is the question as a user turn, the answer what the assistant
    writes before its end of turn; the k-shot score is computed apart from it."""
    tok = load_tokenizer(tiny_backbone)
    items = data.load_examples("gsm8k", "test", limit=4)
    refs = {e.text: e.meta["short_answer"] for e in items}
    chat_prompts = {tuple(qa_prompt_ids(tok, e.text)): e for e in items}
    seen = []

    def fake_generate(model, prompts, max_new_tokens, eos_id, **kw):
        out = []
        for p in prompts:
            if tuple(p) not in chat_prompts:              # the k-shot prompt: a wrong final number
                out.append(tok.encode(" 3 + 4 = 7\n#### 123456789"))
                continue
            e = chat_prompts[tuple(p)]
            seen.append((e.id, max_new_tokens, eos_id))
            i = items.index(e)
            if i == 0:      # right, ended by the other end marker (kept by the stop rule, then cut)
                out.append(tok.encode(f"She pays 2 * 3 = 6.\n#### {refs[e.text]}") + [tok.special_tokens["<|endoftext|>"]])
            elif i == 1:    # right, no "####": the last number counts
                out.append(tok.encode(f"So the answer is {refs[e.text]}."))
            elif i == 2:    # wrong
                out.append(tok.encode("#### 123456789"))
            else:           # cut at the token budget: never finished, no number
                out.append((tok.encode(" and then") * max_new_tokens)[:max_new_tokens])
        return out

    monkeypatch.setattr(tasks, "generate_from_ids", fake_generate)
    out = tmp_path / "g.json"
    summary = ev.main(["task", "gsm8k", "--model", str(tiny_backbone), "--limit", "4", "--shots", "1",
                       "--loss-limit", "4", "--out", str(out), "--dtype", "fp32"])
    recs = json.loads(out.read_text())["items"]
    assert sorted(seen) == sorted((e.id, tasks.GSM8K_CHAT_TOKENS, tok.eos_id) for e in items)
    assert [r["chat_correct"] for r in recs] == [True, True, False, False]
    assert [r["chat_finished"] for r in recs] == [True, True, True, False]
    assert recs[0]["chat_completion"] == f"She pays 2 * 3 = 6.\n#### {refs[items[0].text]}"   # no end marker
    assert summary["score"] == 0.0 and summary["correct"] == 0              # the k-shot metric, unchanged
    assert summary["chat_score"] == 0.5 and summary["chat_correct"] == 2 and summary["chat_finished"] == 3
    summary = ev.main(["task", "gsm8k", "--model", str(tiny_backbone), "--limit", "4", "--shots", "1",
                       "--loss-limit", "4", "--out", str(out), "--dtype", "fp32", "--no-chat"])
    assert "chat_score" not in summary and "chat_correct" not in json.loads(out.read_text())["items"][0]


def test_mbpp_code_from_a_chat_answer():
    answer = ("Here is a function that does it:\n\n```python\nimport math\n\ndef helper(x):\n    return x * 2\n\n"
              "def double_all(xs):\n    # uses the helper\n    return [helper(x) for x in xs]\n\n"
              "print(double_all([1, 2]))\nassert double_all([1]) == [3]\n```\n\nThis doubles each element.")
    code = tasks.mbpp_code(answer)
    assert code == ("import math\ndef helper(x):\n    return x * 2\n\ndef double_all(xs):\n"
                    "    # uses the helper\n    return [helper(x) for x in xs]\n")
    # no fences, a decorator, a block cut at the token budget
    assert tasks.mbpp_code("Sure!\n@cache\ndef f(n):\n    return n\nf(3)") == "@cache\ndef f(n):\n    return n\n"
    assert tasks.mbpp_code("```python\n    def g():\n        return 1") == "def g():\n    return 1\n"
    assert tasks.mbpp_code("I cannot write code.") == "I cannot write code."
    tests = ["assert set(similar_elements((3, 4), (5, 4))) == set((4,))"]
    assert tasks.mbpp_entry_point(tests) == "similar_elements"
    assert tasks.mbpp_bind_entry_point("def common(a, b):\n    return 1\n", "similar_elements").endswith(
        "\nsimilar_elements = common\n")
    assert tasks.mbpp_bind_entry_point("def similar_elements(a, b):\n    return 1\n", "similar_elements") == \
        "def similar_elements(a, b):\n    return 1\n"


def test_boolq_chat_follows_the_larger_probability(tiny):
    """BoolQ in the chat format: the text as the user turn, each label's log-probability the
    log-sum of its spellings' first tokens as the assistant's first token; the larger one wins."""
    model, tok = tiny
    words = tasks.boolq_chat_tokens(tok)
    assert words == {"true": sorted({tok.encode("True")[0], tok.encode("true")[0]}),
                     "false": sorted({tok.encode("False")[0], tok.encode("false")[0]})}
    items = data.load_examples("boolq", "dev", limit=4)
    records = tasks.run_boolq_chat(model, tok, items, batch_size=3)
    for e, r in zip(items, records):
        p = qa_prompt_ids(tok, e.text)
        assert tok.decode(p).endswith("assistant\n") and e.meta["passage"] in tok.decode(p)
        lp = model(model.embed(torch.tensor([p])))[0, -1].float().log_softmax(-1)
        want = {k: torch.logsumexp(lp[ids], 0).item() for k, ids in words.items()}
        assert r["chat_logprobs"] == pytest.approx(want, abs=1e-4)
        assert r["chat_prediction"] == max(want, key=want.get)
        assert r["chat_correct"] == (r["chat_prediction"] == e.answer)


def test_boolq_majority_label_and_true_shares(tiny_backbone, tmp_path):
    mk = lambda i, a: data.Example(f"q{i}", f"boolq/dev/{i}", a)
    items = [mk(0, "true"), mk(1, "false"), mk(2, "false"), mk(3, "false")]
    recs = [{"prediction": "false", "chat_prediction": "true"}] * 3 + [{"prediction": "true", "chat_prediction": "true"}]
    got = tasks.boolq_priors(items, recs)
    assert got == {"majority_label": "false", "majority_accuracy": 0.75, "reference_true_share": 0.25,
                   "true_share": 0.25, "chat_true_share": 1.0}
    out = tmp_path / "b.json"
    summary = ev.main(["task", "boolq", "--model", str(tiny_backbone), "--limit", "6", "--loss-limit", "6",
                       "--out", str(out), "--dtype", "fp32"])
    recs = json.loads(out.read_text())["items"]
    heldout = data.load_examples("boolq", "dev", limit=6)
    n_true = sum(e.answer == "true" for e in heldout)
    assert summary["majority_accuracy"] == max(n_true, 6 - n_true) / 6
    assert summary["majority_label"] == ("true" if n_true >= 3 else "false")
    assert summary["true_share"] == sum(r["prediction"] == "true" for r in recs) / 6
    assert summary["chat_true_share"] == sum(r["chat_prediction"] == "true" for r in recs) / 6
    assert summary["chat_score"] == sum(r["chat_correct"] for r in recs) / 6


def test_answer_loss_on_all_items_when_limit_is_smaller(tiny_backbone, tmp_path):
    """The metric's --limit does not cut the answer loss: by default it covers every held-out item,
    each one's loss and token count kept for a paired bootstrap (stats.compare_evals)."""
    import stats
    heldout = data.load_examples("mbpp", "test")
    out = tmp_path / "m.json"
    summary = ev.main(["task", "mbpp", "--model", str(tiny_backbone), "--limit", "2", "--loss-only",
                       "--out", str(out), "--dtype", "fp32"])
    written = json.loads(out.read_text())
    losses = written["answer_losses"]
    assert summary["n"] == 2 and summary["answer_n"] == len(heldout) == len(losses) == 125
    assert [a["id"] for a in losses] == [e.id for e in heldout]
    assert summary["answer_tokens"] == sum(a["tokens"] for a in losses)
    assert summary["answer_loss"] == pytest.approx(sum(a["loss"] * a["tokens"] for a in losses)
                                                   / summary["answer_tokens"], rel=1e-6)
    for r, a in zip(written["items"], losses):        # the metric's items carry their own loss too
        assert r["id"] == a["id"] and r["answer_loss"] == a["loss"]
    out3 = tmp_path / "m3.json"
    summary3 = ev.main(["task", "mbpp", "--model", str(tiny_backbone), "--limit", "2", "--loss-only",
                        "--loss-limit", "3", "--out", str(out3), "--dtype", "fp32"])
    assert summary3["answer_n"] == 3
    assert [a["loss"] for a in json.loads(out3.read_text())["answer_losses"]] == \
        pytest.approx([a["loss"] for a in losses[:3]], rel=1e-4)
    same = stats.compare_evals(out, out, B=200)
    assert set(same) == {"answer_loss"} and same["answer_loss"]["diff"] == 0
    assert same["answer_loss"]["verdict"] == "tie"
