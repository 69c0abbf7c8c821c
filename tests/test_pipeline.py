"""pipeline.py: parsing, dedup, the cluster subsample, decontamination, resuming, and the tiny preset
end to end on a random backbone (the real steps on tiny data, nothing mocked)."""
import json
import pytest

import data
import pipeline as pl
from conftest import has_package


def test_parse_numbered_list():
    text = ("How many apples does Tom have?\nQuestion 2: What is 3 + 4?\n\nQuestion 3: A train goes 60 mph.\n"
            "How far in 2 hours?\n**Question 4:** Last one?")
    assert pl.parse_numbered(text) == ["How many apples does Tom have?", "What is 3 + 4?",
                                       "A train goes 60 mph.\nHow far in 2 hours?", "Last one?"]
    assert pl.parse_numbered("1. First?\n2. Second?") == ["First?", "Second?"]
    assert pl.parse_numbered("   \n") == []
    # the list run on in one line, as the 135M model writes it
    assert pl.parse_numbered("20 boys, how many girls? Question 2: How many stars? Question 3:  Ben left.") == [
        "20 boys, how many girls?", "How many stars?", "Ben left."]
    assert pl.parse_numbered("Which question 2 is it?") == ["Which question 2 is it?"]
    # a number inside a sentence is not a marker
    assert pl.parse_numbered("Sam has 2. apples? No: 3 apples.") == ["Sam has 2. apples? No: 3 apples."]


def test_dedup_keeps_exactly_one_of_each_duplicate():
    texts = ["a b", "a  b", "c", " a b\n", "d", "c", ""]
    keep = pl.dedup(texts)
    assert keep == [0, 2, 4]


@pytest.mark.parametrize("n", [1, 7, 30, 59, 60])
def test_cluster_subsample_returns_n_distinct(n):
    texts = [f"question {i} about {'apples' if i % 3 else 'trains'} number {i * 7}" for i in range(60)]
    chosen = pl.cluster_subsample(texts, n, n_clusters=8, dims=5, seed=0)
    assert len(chosen) == n == len(set(chosen)) and all(0 <= i < 60 for i in chosen)


def test_cluster_subsample_round_robin_covers_every_cluster_first():
    texts = ["apple pie recipe"] * 0 + [f"apple pie {i}" for i in range(20)] + [f"train station {i}" for i in range(3)]
    chosen = pl.cluster_subsample(texts, 4, n_clusters=2, dims=3, seed=0)
    assert sum(i >= 20 for i in chosen) >= 1             # the small cluster is not starved


def test_decontamination_drops_the_planted_overlap_and_nothing_else():
    test = ["Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."]
    planted = "Yesterday natalia sold clips to 12 of her friends in April and then she sold half as many clips"
    pairs = [{"question": planted, "answer": "x"},
             {"question": "How many clips did she sell?", "answer": "She sold 72 clips in April and May."},
             {"question": "q", "answer": "so " + planted.upper()},      # case and digits do not hide it
             {"question": "Natalia sold clips to her friends in April and then she sold", "answer": "12 words"}]
    kept, dropped = pl.decontaminate(pairs, test, 13)
    assert dropped == [pairs[0], pairs[2]] and kept == [pairs[1], pairs[3]]


def test_templates_are_complete():
    for task, t in pl.TEMPLATES.items():
        assert set(t) == {"question", "answer", "critique", "refine"}
        assert "{q}" in t["question"] and "{q}" in t["answer"] and "{c}" in t["refine"]
        assert "Stop" in t["refine"]


def tiny_cfg(backbone, method, **kw):
    cfg, _, _ = pl.parse_args(["--task", "gsm8k", "--method", method, "--preset", "tiny", "--generator", str(backbone),
                               "--answerer", str(backbone), "--student", str(backbone), "--dtype", "fp32"])
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.mark.parametrize("method", ["np", "pt", "train"])
def test_tiny_preset_end_to_end(tiny_backbone, tmp_path, method, capsys, monkeypatch):
    # A random tiny model never ends an answer nor writes a final number; here only empty answers are
    # dropped, so pairs flow through (the gates themselves: tests/test_answers.py).
    monkeypatch.setattr(pl.answers, "gate", lambda task, text, finished: None if text.strip() else "empty")
    out = pl.run_pipeline(tiny_cfg(tiny_backbone, method), str(tmp_path / method), stop_after="decontam")
    first = (["train"] if method == "np" else []) + ["generate", "answer", "decontam"]
    assert list(json.loads((out / "state.json").read_text())) == first and not (out / "report.md").exists()
    assert "stopped after decontam" in capsys.readouterr().out and (out / "data.jsonl").exists()
    out = pl.run_pipeline(tiny_cfg(tiny_backbone, method), str(tmp_path / method))     # goes on from there
    state = json.loads((out / "state.json").read_text())
    steps = ["generate", "answer", "decontam", "finetune", "evaluate"]
    assert list(state) == (["train"] if method == "np" else []) + steps
    g = state["generate"]
    assert g["subsampled"] == min(12, g["unique"]) and g["unique"] <= g["generated"]
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert len(rows) == state["decontam"]["kept"] > 0
    # only answers that passed the gates are trained on, at most N of them, in subsample order
    answered = data.read_jsonl(out / "answers.jsonl")
    usable = [r for r in answered if r["drop"] is None]
    a = state["answer"]
    assert a["usable"] == len(usable) and a["attempted"] == len(answered)
    assert sum(a["dropped"].values()) == len(answered) - len(usable)
    assert [r["question"] for r in rows] == [r["question"] for r in sorted(usable, key=lambda r: r["index"])][:12]
    if method == "train":     # the control: real questions with their reference answers, N of them
        assert len(rows) == 12 and a["dropped"] == {}
        refs = {e.text: e.answer for e in data.load_examples("gsm8k", "train")}
        assert all(r["question"] in refs for r in rows)
    assert all(isinstance(r["question"], str) and isinstance(r["answer"], str) for r in rows)
    if has_package("datasets"):
        import datasets
        assert len(datasets.load_dataset("json", data_files=str(out / "data.jsonl"))["train"]) == len(rows)
    curve = state["evaluate"]["curve"]
    assert [c["step"] for c in curve] == [0] + state["finetune"]["checkpoints"]
    assert all(c["answer_loss"] > 0 for c in curve)
    assert 0 <= state["evaluate"]["mauve"]["test"]["mauve"] <= 1
    report = (out / "report.md").read_text()
    assert "## Fine-tuning curve" in report and "MAUVE" in report
    assert json.loads((out / "report.json").read_text())["steps"] == state
    # a second run of the same command does nothing again
    capsys.readouterr()
    pl.run_pipeline(tiny_cfg(tiny_backbone, method), str(out))
    assert "[answer] already done" in capsys.readouterr().out


def test_interrupted_answer_step_resumes_to_the_same_output(tiny_backbone, tmp_path, monkeypatch):
    cfg = tiny_cfg(tiny_backbone, "pt", batch_size=2, answer_tokens=8)
    questions = [{"index": i, "question": f"What is {i} + {i}?"} for i in range(11)]
    clean, run = pl.Run(cfg, tmp_path / "clean"), pl.Run(cfg, tmp_path / "cut")
    for r in (clean, run):
        data.write_jsonl(r.out / "questions.jsonl", questions)
    pl.step_answer(clean)

    real, calls = pl.answers.generate_from_ids, []

    def dies_on_second_chunk(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(pl.answers, "generate_from_ids", dies_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        pl.step_answer(run)
    assert not run.done("answer") and len(data.read_jsonl(run.out / "answers.jsonl")) == 8   # one chunk
    monkeypatch.setattr(pl.answers, "generate_from_ids", real)
    pl.step_answer(run)
    assert run.done("answer")
    assert data.read_jsonl(run.out / "answers.jsonl") == data.read_jsonl(clean.out / "answers.jsonl")


def test_other_settings_and_bad_input_are_one_line(tiny_backbone, tmp_path, capsys):
    pl.Run(tiny_cfg(tiny_backbone, "pt"), tmp_path / "r")
    with pytest.raises(ValueError, match=r"other settings \(n_generate: 24 -> 30\)"):
        pl.Run(tiny_cfg(tiny_backbone, "pt", n_generate=30), tmp_path / "r")
    settings = tmp_path / "r" / "settings.json"            # a folder written before --answer-min-tokens
    data.write_json(settings, {k: v for k, v in data.read_json(settings).items() if k != "answer_min_tokens"})
    with pytest.raises(ValueError, match=r"other settings \(answer_min_tokens: 0 -> 1\)"):
        pl.Run(tiny_cfg(tiny_backbone, "pt"), tmp_path / "r")
    pl.Run(tiny_cfg(tiny_backbone, "pt", answer_min_tokens=0), tmp_path / "r").close()   # resumes with its value
    with pytest.raises(SystemExit):
        pl.parse_args(["--task", "nope"])
    with pytest.raises(SystemExit):
        pl.parse_args(["--method", "pt", "--train-steps", "3"])
    with pytest.raises(SystemExit) as e:
        pl.main(["--method", "pt", "--preset", "tiny", "--generator", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "m")])
    assert "missing" in str(e.value) and "\n" not in str(e.value)


def test_self_refine_stops_on_stop_and_keeps_refining_the_rest(tiny_backbone, tmp_path, monkeypatch):
    """PT_SR (Fig. 11): a question is final once the refiner says 'Stop'; the others are replaced by
    the refined text, round after round, up to sr_rounds; an empty refinement keeps the question."""
    cfg = tiny_cfg(tiny_backbone, "pt_sr", sr_rounds=2)
    run = pl.Run(cfg, tmp_path / "sr")
    prompts = []

    def fake_complete(model, tok, texts, cfg, seed, chat=True, max_new=None, stop=None):
        prompts.extend(texts)
        if texts[0].startswith("Please provide actionable feedback"):
            return ["clear and original"] * len(texts)
        out = []
        for t in texts:
            q = t.split("Question: ", 1)[1].split(" Critique:", 1)[0]
            out.append("\u2019Stop\u2019" if q.startswith("keep") else "" if q.startswith("empty") else q + "+")
        return out
    monkeypatch.setattr(pl, "_complete", fake_complete)
    final, stats = pl.refine_sr(run, ["keep me", "fix me", "empty one"])
    assert final == ["keep me", "fix me++", "empty one"]
    assert stats["rounds"] == [{"round": 1, "questions": 3, "stopped": 1, "empty_kept": 1, "refined": 1},
                               {"round": 2, "questions": 2, "stopped": 0, "empty_kept": 1, "refined": 1}]
    assert any("Critique: clear and original If the critique is strongly positive" in p for p in prompts)


def test_answer_step_draws_reserves_until_n_usable_pairs(tiny_backbone, tmp_path, monkeypatch):
    """Dropped answers are replaced by the next questions in subsample order, up to answer_attempts x N;
    a resumed step writes the same file as an uninterrupted one."""
    cfg = tiny_cfg(tiny_backbone, "mc", n_keep=4, batch_size=2, answer_attempts=3.0)
    questions = [{"index": i, "question": f"q{i}"} for i in range(20)]

    class Fake:       # every question whose number is a multiple of 3 gets an answer that loops
        def answer(self, qs, seed, indices=None):
            return [{"answer": "x " * 30 if int(q[1:]) % 3 == 0 else f"{q}\n#### 1",
                     "finished": True, "drop": "loop" if int(q[1:]) % 3 == 0 else None} for q in qs]
    monkeypatch.setattr(pl, "make_answerer", lambda run: Fake())
    run = pl.Run(cfg, tmp_path / "r")
    data.write_jsonl(run.out / "questions.jsonl", questions)
    pl.step_answer(run)
    recs = data.read_jsonl(run.out / "answers.jsonl")
    # round 1: q0-q3 (q0, q3 loop); round 2: 2 missing -> q4, q5 (q5... 5 % 3 != 0) -> 4 usable
    assert [r["index"] for r in recs] == list(range(6))
    assert run.state["answer"]["usable"] == 4 and run.state["answer"]["dropped"] == {"loop": 2}
    cfg2 = tiny_cfg(tiny_backbone, "mc", n_keep=10, batch_size=2, answer_attempts=1.5)
    run2 = pl.Run(cfg2, tmp_path / "capped")
    data.write_jsonl(run2.out / "questions.jsonl", questions)
    pl.step_answer(run2)
    assert run2.state["answer"]["attempted"] == 15 and run2.state["answer"]["usable"] == 10


def test_target_full_trains_on_whole_examples_and_needs_no_answerer(tiny_backbone, tmp_path, monkeypatch):
    """--target full: SS_MC learns "Question: ...\nAnswer: ..." texts; the pairs come from its samples,
    gated like answers (the answering LM is never loaded)."""
    cfg = tiny_cfg(tiny_backbone, "mc", target="full")
    monkeypatch.setattr(pl, "make_answerer", lambda run: pytest.fail("no answerer for --target full"))
    # a random tiny model never writes "Answer:": split its samples in two instead, and keep them all
    real_split = pl.answers.split_example
    monkeypatch.setattr(pl.answers, "split_example", lambda t: real_split(
        "Question: " + t[:len(t) // 2] + "\nAnswer: " + t[len(t) // 2:]))
    monkeypatch.setattr(pl.answers, "gate", lambda task, text, finished: None if text.strip() else "empty")
    out = pl.run_pipeline(cfg, str(tmp_path / "full"), stop_after="decontam")
    ex = data.read_jsonl(out / pl.FULL_EXAMPLES)
    assert ex[0]["text"].startswith("Question: ") and "\nAnswer: " in ex[0]["text"]
    settings = json.loads((out / "softsrv" / "config.json").read_text())["config"]
    assert settings["data"].endswith(pl.FULL_EXAMPLES) and settings["field"] == "text"
    state = json.loads((out / "state.json").read_text())
    assert state["generate"]["generated"] == 24
    gen = {r["context_id"]: r["text"] for r in data.read_jsonl(out / "generated.jsonl")}
    rows = data.read_jsonl(out / "data.jsonl")
    assert len(rows) == state["decontam"]["kept"] == 12
    texts = set(gen.values())
    assert all(any(r["question"] in t and r["answer"] in t for t in texts) for r in rows)


def test_parse_args_refuses_inconsistent_answer_options():
    for argv in (["--method", "pt", "--target", "full"], ["--answer-samples", "3"],
                 ["--task", "boolq", "--answer-samples", "3", "--answer-temperature", "0.7"],
                 ["--answer-attempts", "0.5"], ["--ft-steps", "0"]):
        with pytest.raises(SystemExit):
            pl.parse_args(argv)
    cfg, _, _ = pl.parse_args(["--answer-format", "fewshot", "--answer-samples", "3", "--answer-temperature", "0.7"])
    assert (cfg.answer_format, cfg.answer_samples) == ("fewshot", 3)


# ----------------------------------------------------------------------------------------------
# A user's own target (--data): not one of the three tasks

TOPICS = ["volcano", "violin", "glacier", "tulip", "comet", "harbor", "falcon", "pyramid", "orchid", "canyon"]


def write_custom(path, n=40, answers=True):
    """Trivia-like records of the user's own making, with an extra field the pipeline ignores."""
    rows = []
    for i in range(n):
        t = TOPICS[i % len(TOPICS)]
        rec = {"question": f"Which {t} number {i} is the oldest {t} in region {i * 7 % 13}?", "source": "mine"}
        if answers:
            rec["answer"] = f"The {t} {i}"
        rows.append(rec)
    data.write_jsonl(path, rows)
    return path


def custom_cfg(backbone, path, method, *extra, **kw):
    cfg, _, _ = pl.parse_args(["--data", str(path), "--field", "question", "--method", method, "--preset", "tiny",
                               "--generator", str(backbone), "--answerer", str(backbone), "--student", str(backbone),
                               "--dtype", "fp32", *extra])
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.mark.parametrize("method", ["np", "pt", "train"])
def test_custom_target_end_to_end(tiny_backbone, tmp_path, method, monkeypatch):
    """--data FILE: every step runs on the user's file; its held-out 10% is the test side and is never
    trained on, never a PT seed, never in the train arm; the report names the file and its sha256,
    says there is no task metric, and gives the answer loss on the test side."""
    monkeypatch.setattr(pl.answers, "gate", lambda task, text, finished: None if text.strip() else "empty")
    path = write_custom(tmp_path / "mine.jsonl")
    cfg = custom_cfg(tiny_backbone, path, method, "--answer-field", "answer")
    assert cfg.task == pl.CUSTOM
    out = pl.run_pipeline(cfg, str(tmp_path / method))
    state = json.loads((out / "state.json").read_text())
    assert list(state) == (["train"] if method == "np" else []) + ["generate", "answer", "decontam", "finetune",
                                                                   "evaluate"]
    examples = data.load_examples(str(path), field="question", answer_field="answer")
    held_in, test = data.split_heldout(examples, 4, seed=0)      # 10% of 40, drawn with --seed 0
    assert pl.target_split(cfg) == (held_in, test)
    test_q = {e.text for e in test}
    if method == "np":       # SoftSRV trained on the held-in records only
        assert [r["text"] for r in data.read_jsonl(out / pl.TARGET_TRAIN)] == [e.text for e in held_in]
        assert json.loads((out / "softsrv" / "config.json").read_text())["n_train"] == 36 - 3
    if method == "pt":       # seeds from the held-in records, the generic templates
        seeds = {r["context_id"] for r in data.read_jsonl(out / "pt_completions.jsonl")}
        assert seeds and seeds <= {e.id for e in held_in}
        assert json.loads((out / "report.json").read_text())["templates"] == pl.TEMPLATES["generic"]
        assert "PT templates: generic" in (out / "report.md").read_text()
    rows = data.read_jsonl(out / "data.jsonl")
    assert rows and not test_q & {r["question"] for r in rows}
    if method == "train":    # the control: held-in records with their reference answers
        ref = {e.text: e.answer for e in held_in}
        assert len(rows) == 12 and all(ref[r["question"]] == r["answer"] for r in rows)
    curve = state["evaluate"]["curve"]
    assert [c["step"] for c in curve] == [0] + state["finetune"]["checkpoints"]
    assert all(c["score"] is None and c["metric"] is None and c["answer_loss"] > 0 and c["n"] == 4 for c in curve)
    m = state["evaluate"]["mauve"]
    assert (m["test"]["n_ref"], m["train"]["n_ref"]) == (4, 36) and 0 <= m["test"]["mauve"] <= 1
    report = (out / "report.md").read_text()
    assert f"`{path}` (sha256 `{data.file_sha256(path)}`)" in report and "36 held-in records" in report
    assert "No task metric" in report and "| step | held-out answer loss |" in report and "None" not in report
    assert "10% of the file held out" in report and "against the held-in records: **" in report


def test_custom_target_test_file_and_no_answers(tiny_backbone, tmp_path, monkeypatch):
    """--test FILE is the test side (all of --data trains); without --answer-field there is no answer
    loss, and the report says so; a changed data file is refused on resume."""
    monkeypatch.setattr(pl.answers, "gate", lambda task, text, finished: None if text.strip() else "empty")
    path, test = write_custom(tmp_path / "mine.jsonl", 30, answers=False), write_custom(tmp_path / "t.jsonl", 5)
    cfg = custom_cfg(tiny_backbone, path, "mc", "--test", str(test))
    assert [len(x) for x in pl.target_split(cfg)] == [30, 5]
    out = pl.run_pipeline(cfg, str(tmp_path / "r"))
    curve = json.loads((out / "state.json").read_text())["evaluate"]["curve"]
    assert all(c["answer_loss"] is None for c in curve)
    report = (out / "report.md").read_text()
    assert "No held-out answer loss either" in report and f"`{test}` (sha256" in report
    write_custom(path, 31, answers=False)
    with pytest.raises(ValueError, match="data_sha256"):
        pl.run_pipeline(custom_cfg(tiny_backbone, path, "mc", "--test", str(test)), str(out))


def test_custom_fewshot_shots_are_held_in_records(tiny_backbone, tmp_path):
    path = write_custom(tmp_path / "mine.jsonl")
    cfg = custom_cfg(tiny_backbone, path, "mc", "--answer-field", "answer", "--answer-format", "fewshot")
    answerer = pl.make_answerer(pl.Run(cfg, tmp_path / "r"))
    held_in, _ = pl.target_split(cfg)
    assert answerer.shots == held_in[:3]
    prompt = answerer.tok.decode(answerer.prompt_ids("Which comet?"))
    assert prompt.startswith(pl.answers.EXAMPLE.format(q=held_in[0].text, a=held_in[0].answer) + "\n\n")
    assert prompt.endswith("Question: Which comet?\nAnswer:")
    assert pl.answers.gate(pl.CUSTOM, "The comet 3", True) is None      # custom: unfinished/loop/empty only
    assert pl.answers.gate(pl.CUSTOM, "The comet 3", False) == "unfinished"


def test_pt_template_file_and_generic_parse(tmp_path):
    t = tmp_path / "t.json"
    t.write_text(json.dumps({"question": "Like this: {q} More, Example 1:", "refine": "{q} / {c} Stop"}))
    cfg, _, _ = pl.parse_args(["--data", str(tmp_path / "x.jsonl"), "--method", "pt", "--pt-template", str(t)])
    T = pl.templates(cfg)
    assert T["question"] == "Like this: {q} More, Example 1:" and T["answer"] == pl.TEMPLATES["generic"]["answer"]
    assert pl.parse_numbered("First one? Example 2: Second one?\nExample 3: Third?") == [
        "First one?", "Second one?", "Third?"]


@pytest.mark.parametrize("case,what", [
    ("missing", "field 'answer' missing or unusable in 3 of 12 records"),
    ("empty_test", "no examples"),
    ("too_few", "too few to hold out 10%"),
    ("template", "must contain {q}"),
    ("softsrv_too_few", "fewer than the 1 it holds out + a batch of 4"),
])
def test_custom_bad_input_is_one_line_and_leaves_no_run(tmp_path, case, what):
    path = write_custom(tmp_path / "mine.jsonl", 12)
    argv = ["--data", str(path), "--field", "question", "--answer-field", "answer", "--method", "pt",
            "--preset", "tiny", "--out", str(tmp_path / "run")]
    if case == "missing":
        rows = data.read_jsonl(path)
        for r in rows[2:5]:
            del r["answer"]
        data.write_jsonl(path, rows)
    elif case == "empty_test":
        (tmp_path / "t.jsonl").write_text("\n")
        argv += ["--test", str(tmp_path / "t.jsonl")]
    elif case == "too_few":
        write_custom(path, 1)
    elif case == "template":
        (tmp_path / "t.json").write_text(json.dumps({"question": "Generate 10 more. Example 1:"}))
        argv += ["--pt-template", str(tmp_path / "t.json")]
    elif case == "softsrv_too_few":
        write_custom(path, 5)
        argv[argv.index("pt")] = "mc"
    with pytest.raises(SystemExit) as e:
        pl.main(argv)
    assert what in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "run").exists()


def test_custom_options_refused_in_one_line(tmp_path, capsys):
    f = str(tmp_path / "x.jsonl")
    for argv, what in ((["--data", f, "--method", "train"], "--method train"),
                       (["--data", f, "--answer-format", "fewshot"], "--answer-format fewshot"),
                       (["--data", f, "--task", "gsm8k"], "--task and --data"),
                       (["--answer-field", "a"], "applies to --data"),
                       (["--data", f, "--pt-template", f], "--pt-template"),
                       (["--data", "gsm8k"], "a registered dataset")):
        with pytest.raises(SystemExit):
            pl.parse_args(argv)
        assert what in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:       # the help text formats (a bare % in it would not)
        pl.parse_args(["--help"])
    assert e.value.code == 0 and "--answer-field" in capsys.readouterr().out
