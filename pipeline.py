"""The paper's pipeline end to end (Sec. 3.3 Steps 1-6, Appendix A.2, A.3, C), one run per (task, method).

    python pipeline.py --task gsm8k --method mc                  # SoftSRV SS_MC, cpu preset
    python pipeline.py --task gsm8k --method pt                  # the prompt-template baseline
    python pipeline.py --task gsm8k --method mc --preset tiny    # everything, a few minutes
    torchrun --nproc_per_node=2 pipeline.py --task gsm8k --method mc   # 2 processes share the decoding
    python pipeline.py --data my.jsonl --field question --answer-field answer --method mc   # your own target

Steps, each writing into the run folder (default runs/<task>-<method>) and skipped when its output
is already complete, so the same command after an interruption continues where it stopped:
  1. train       SoftSRV methods: train.py's training of P_θ on the task's train questions  -> softsrv/
  2. generate    questions: SoftSRV samples (generate.py) or template completions (PT, PT_SR),
                 then exact-duplicate removal and the TF-IDF/SVD/k-means subsample (A.2)  -> questions.jsonl
  3. answer      the answering LM answers each question (SoftSRV: the question as-is in its chat
                 format; PT/PT_SR: Fig. 9's answer template; train: the reference answers) -> answers.jsonl
  4. decontam    drop pairs sharing a 13-gram with an evaluated test item (A.3)            -> data.jsonl
  5. finetune    the student on data.jsonl (finetune.py)                                    -> finetune/step-N
  6. evaluate    task metric + held-out answer loss per checkpoint, MAUVE of the questions  -> eval/, mauve.json
and report.md / report.json / curve.png. Methods: np, mp, mc (SoftSRV, Eq. 1-3), pt, pt_sr (the
templates of Appendix C, word for word, in TEMPLATES), train (the real train fold itself).

Your own target (--data FILE, task "custom"): the same steps on the file's records; the test side
(--test FILE, or a seeded 10% of FILE) is what decontamination, the answer loss and MAUVE use, and is
never trained on; PT uses --pt-template or TEMPLATES["generic"]; there is no task metric.

Under torchrun (gloo on CPUs, nccl on GPUs) every rank takes part in steps 1-3 and 6: the training
is train.py's data-parallel one, and the generations, answers and evaluated items are dealt out, and
rank 0 writes the results in order, so every file is the one a single process writes with the same
seed. Steps 4-5 and MAUVE run in rank 0 alone while the other ranks wait.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import string
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import answers
import data
import mauve
import options
import softsrv
import student
import tasks
from dist import append_in_rounds, cli_errors, init_distributed, rank0_first
from runtime import DTYPES, dtype_of, keep_freed_memory
from sampling import cut_at, generate_from_ids, stop_on
from tokenizer import qa_prompt_ids
from weights import DEFAULT_MODEL, check_model, load_model, load_tokenizer

TASKS = ("gsm8k", "mbpp", "boolq")
METHODS = ("np", "mp", "mc", "pt", "pt_sr", "train")
SOFTSRV = ("np", "mp", "mc")

# ----------------------------------------------------------------------------------------------
# Appendix C, word for word. [insert ...] is written {q} / {c}.

TEMPLATES = {
    "mbpp": {
        "question": "Consider the following python question: {q} Now generate 10 different questions that require "
                    "writing a Python function similar to the example above. Make sure each question is different and "
                    "sufficiently rephrased. Please make sure you generate questions, and not answers. Please make sure "
                    "each question you generate has a well-defined answer. Question 1:",
        "answer": "Please answer the following python question: {q} Please generate your answer as a Python function. "
                  "The docstring of the function should contain the above question as-is, without any modification. "
                  "Please make sure that your function is valid Python code that compiles. Please try your best to "
                  "correctly answer the question. Answer:",
        "critique": "Please provide actionable feedback on the clarity, difficulty, and originality of the following "
                    "Python question: {q}",
        "refine": "Read the following Python question and the critique, and write a new Python question based on the "
                  "critique: Question: {q} Critique: {c} If the critique is strongly positive, say \u2019Stop\u2019. "
                  "Otherwise, write a new Python question in a single sentence starting with \u2019Write a Python "
                  "function\u2019 based on the critique. Do not ask for docstring or test cases.",
    },
    "gsm8k": {
        "question": "Consider the following grade-school math problem: {q} Now generate 10 different questions that "
                    "require solving a grade-school math problem similar to the example above. Make sure each question "
                    "is different and sufficiently rephrased. Please make sure you generate questions, and not answers. "
                    "Please make sure each question you generate has a well-defined answer. Question 1:",
        "answer": "Please answer the following question that tests reasoning: {q} Answer:",
        "critique": "Please provide actionable feedback on the clarity, difficulty, and originality of the following "
                    "grade school math problem: {q}",
        "refine": "Read the following grade-school math problem and the critique, and write a new grade-school math "
                  "problem based on the critique: Question: {q} Critique: {c} If the critique is strongly positive, "
                  "say \u2019Stop\u2019. Otherwise, write a new grade-school math problem based on the critique. Write "
                  "the question only, do not include the answer.",
    },
    "boolq": {
        "question": "Consider the following passage and question: {q} Now generate 10 different passages and questions "
                    "similar to the example above. Please make sure each question you generate has a boolean answer "
                    "that can be answered by the passage. Make sure each passage and question is different and "
                    "sufficiently rephrased. Please make sure you generate passages and questions, and not answers. "
                    "Passage and Question 1:",
        "answer": "Please answer the following question based on the passage. Your answer should be either True or "
                  "False. Do not provide any other justification. {q} Answer:",
        "critique": "Please provide actionable feedback on the clarity, difficulty, and originality of the following "
                    "passage/question problem: {q}",
        "refine": "Read the following passage/question problem and the critique, and write a new passage/question "
                  "problem based on the critique: Question: {q} Critique: {c} If the critique is strongly positive, "
                  "say \u2019Stop\u2019. Otherwise, write a new passage/question problem based on the critique. Write "
                  "the passage and question only, do not include the answer.",
    },
    # A user's own target (--data): the same templates with the task's words made general; used when
    # no --pt-template is given.
    "generic": {
        "question": "Consider the following example: {q} Now generate 10 different examples similar to the example "
                    "above. Make sure each example is different and sufficiently rephrased. Please make sure you "
                    "generate examples like the one above, and not answers to it. Please make sure each example you "
                    "generate has a well-defined answer. Example 1:",
        "answer": "Please answer the following question: {q} Answer:",
        "critique": "Please provide actionable feedback on the clarity, difficulty, and originality of the following "
                    "example: {q}",
        "refine": "Read the following example and the critique, and write a new example based on the critique: "
                  "Question: {q} Critique: {c} If the critique is strongly positive, say \u2019Stop\u2019. "
                  "Otherwise, write a new example based on the critique. Write the example only, do not include "
                  "the answer.",
    },
}
TEMPLATE_FIELDS = {"question": {"q"}, "answer": {"q"}, "critique": {"q"}, "refine": {"q", "c"}}

# ----------------------------------------------------------------------------------------------
# Settings

# paper: 100K generated -> 50K kept (GSM8K, MBPP) / 20K (BoolQ), 700 clusters of 100-dim TF-IDF/SVD
# features, Gemma 2B fine-tuned with batch 16 x 8192 tokens, lr 1e-6 after 100 warm-up steps.
# cpu: what 2 cores finish for one (task, method) with the 135M offline models (each step's wall
# time is in the run's state.json and report.md, results/ has two; the fine-tuning and the 5-shot
# evaluation dominate):
# - 1,000 questions generated, 500 kept: the answers to them and the fine-tuning on them are the
#   long steps, so these counts set a run's length; clusters scaled like the paper's 700 per 100K -> 50.
# - SoftSRV sampling: temperature 1 (the paper's) with top-p 0.9: see docs/sampling_sweep/README.md.
# - 5-shot GSM8K on 100 of the 330 held-out items per checkpoint; answer loss on the same 100.
PRESETS = {
    "tiny": dict(train_steps=4, prompt_len=4, n_heldout=8, n_generate=24, n_keep=12, n_clusters=4, svd_dims=8,
                 question_tokens=16, answer_tokens=128, ft_preset="tiny", ft_epochs=1.0, eval_limit=4, eval_loss_limit=4,
                 top_p=0.9, pt_temperature=1.0, pt_top_p=0.9, sr_rounds=1, buckets=2),
    "cpu": dict(train_steps=None, prompt_len=None, n_heldout=100, n_generate=1000, n_keep=500, n_clusters=50,
                svd_dims=100, question_tokens=None, answer_tokens=256, ft_preset="cpu", ft_epochs=1.0,
                eval_limit=100, eval_loss_limit=None, top_p=0.9, pt_temperature=1.0, pt_top_p=0.9, sr_rounds=1, buckets=32),
    "paper": dict(train_steps=None, prompt_len=None, n_heldout=100, n_generate=100_000, n_keep=None,
                  n_clusters=700, svd_dims=100, question_tokens=None, answer_tokens=512, ft_preset="paper",
                  ft_epochs=1.0, eval_limit=None, top_p=1.0, pt_temperature=2.0, pt_top_p=1.0, sr_rounds=3,
                  buckets=32),
}
PAPER_KEEP = {"gsm8k": 50_000, "mbpp": 50_000, "boolq": 20_000}


@dataclass
class PipelineConfig:
    task: str = "gsm8k"
    method: str = "mc"
    preset: str = "cpu"
    generator: str = DEFAULT_MODEL      # H and E (SoftSRV) / the LM that fills the templates (PT)
    answerer: str = DEFAULT_MODEL       # the off-the-shelf LM that answers (Step 3)
    student: str = DEFAULT_MODEL        # the model fine-tuned (Step 5)
    train_steps: int | None = None      # SoftSRV training steps (None: train.py's preset)
    prompt_len: int | None = None       # t (None: train.py's preset)
    n_heldout: int = 100                # train questions held out of SoftSRV training
    n_generate: int = 1000              # questions generated (PT: completions x questions each)
    n_keep: int | None = 500            # N_s, the subsample size (None: the paper's per task)
    n_clusters: int = 50
    svd_dims: int = 100
    temperature: float = 1.0            # SoftSRV sampling (A.2: temperature 1)
    top_p: float = 0.9
    pt_temperature: float = 1.0         # PT / PT_SR (A.2: 2, the best of 1, 2, 4 for Gemma 2B)
    pt_top_p: float = 0.9
    sr_rounds: int = 1                  # PT_SR: critique + refine rounds at most
    question_tokens: int | None = None  # longest generated question (None: train.py's max tokens)
    answer_temperature: float = 0.0     # 0 = greedy
    answer_tokens: int = 256
    answer_format: str = "as-is"        # as-is (the paper's) | fewshot (the same k-shot prompt for every method)
    answer_samples: int = 1             # GSM8K self-consistency: k sampled answers, a strict majority kept
    answer_attempts: float = 2.0        # questions answered at most, as a multiple of the pairs wanted
    answer_min_tokens: int = 1          # EOS not drawn before this many answer tokens (0: allowed first)
    target: str = "question"            # SoftSRV learns the questions, or whole examples (full)
    ngram: int = 13
    ft_preset: str = "cpu"
    ft_epochs: float = 1.0
    ft_lr: float | None = None
    ft_steps: int | None = None         # fine-tuning steps (None: ft_epochs over the pairs); fixed across arms
    ft_checkpoints: int | None = None   # checkpoints saved and evaluated (None: finetune.py's preset)
    eval_limit: int | None = 100        # held-out items of the k-shot and chat metrics per checkpoint (None: all)
    eval_loss_limit: int | None = None  # held-out items of the answer loss (None: all; cheap, and it moves)
    buckets: int = 32                   # MAUVE clusters (the paper's 32)
    batch_size: int = 16
    seed: int = 0
    dtype: str = "auto"
    # A user's own target (task "custom"): the file, its text and answer fields, an optional test file
    # and PT template file; the sha256s are filled in by resolve_target, so a changed file is refused.
    data: str | None = None
    field: str | None = None
    answer_field: str | None = None
    test: str | None = None
    pt_template: str | None = None
    data_sha256: str | None = None
    test_sha256: str | None = None

    def keep(self) -> int:
        return self.n_keep if self.n_keep is not None else PAPER_KEEP.get(self.task, PAPER_KEEP["gsm8k"])


# Settings added after run folders existed, with the value that folders written before them ran with:
# such a folder resumes only when given that value (the refusal names it).
LEGACY_SETTINGS = {"answer_min_tokens": 0}


class Run:
    """The run folder: settings.json (refuses other settings), state.json (finished steps with their
    counts and times), and each step's files; and the processes working on it. Under torchrun every
    rank runs the steps that decode (train, generate, answer, evaluate), each on its share, and rank 0
    alone writes the run's files and runs the rest.

    The folder belongs to one run at a time: rank 0 holds its lock (data.lock: released by the
    kernel however the process ends) until close(), and a second pipeline on the folder is refused
    with one line naming the holder. The other ranks of the same torchrun job take no lock; they
    wait for rank 0's verdict and end with the same line if it is a refusal. settings.json is
    written only once the models are known to load, so a first attempt that fails on a wrong model
    leaves nothing that refuses the corrected command."""

    def __init__(self, cfg: PipelineConfig, out: Path, rank: int = 0, world: int = 1, device: str = "cpu"):
        self.cfg, self.out = cfg, Path(out)
        self.rank, self.world, self.device = rank, world, device
        self._lock = None
        with rank0_first(rank, world):
            if rank == 0:
                self._claim()
        state = self.out / "state.json"
        self.state = data.read_json(state) if state.exists() else {}

    def _claim(self):
        """Rank 0: check the models, lock the folder, compare or record the settings."""
        cfg, mine = self.cfg, asdict(self.cfg)
        path = self.out / "settings.json"
        if not path.exists():           # a folder with settings was checked when they were written
            for name in {cfg.generator, cfg.student} | ({cfg.answerer} if cfg.method != "train" else set()):
                check_model(name)
        self._lock = data.lock(self.out / ".lock", str(self.out))
        try:
            if path.exists():
                theirs = {**LEGACY_SETTINGS, **data.read_json(path)}
                diff = [f"{k}: {theirs.get(k)!r} -> {v!r}" for k, v in mine.items() if theirs.get(k) != v]
                if diff:
                    raise ValueError(f"{self.out}: holds a run with other settings ({'; '.join(diff)}); "
                                     f"choose another --out or delete the folder")
            else:
                _write_json(path, mine)
        except BaseException:
            self.close()
            raise

    def close(self):
        """Let the folder go (the process's end does it too)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def done(self, step: str) -> bool:
        return step in self.state

    def log(self, *args):
        if self.rank == 0:
            print(*args, flush=True)

    def start(self, step: str, what: str) -> float:
        self.log(f"[{step}] {what}")
        return time.time()

    def finish(self, step: str, counts: dict, t0: float):
        self.state[step] = {**counts, "seconds": round(time.time() - t0, 1)}
        if self.rank == 0:
            _write_json(self.out / "state.json", self.state)
        self.log(f"[{step}] done in {self.state[step]['seconds']:.0f}s: "
                 + ", ".join(f"{k} {v}" for k, v in counts.items() if not isinstance(v, (dict, list))))
        if self.world > 1:
            torch.distributed.barrier()    # the step's files are written before any rank reads them


def _write_json(path: Path, obj):
    data.write_json(path, obj)


# ----------------------------------------------------------------------------------------------
# Step 2 helpers: parse, deduplicate, subsample (Appendix A.2)

# "Question N:" starts a question anywhere (small models run the list on in one line: "...? Question 2:
# ..."); a bare "N." / "N)" only at a line start, so "Sam has 2. apples" is not split.
_MARK = re.compile(r"(?im)(?:^|(?<=\s))[*#]*(?:passage and question|question|passage|example)\s*\d+\s*[:.)]\**[ \t]*"
                   r"|^[ \t*]*\d{1,2}[.)][ \t]+")


def parse_numbered(completion: str) -> list[str]:
    """A PT completion -> its questions. The template ends with "Question 1:" (generic: "Example 1:"), so
    the text before the first "Question N:" / "Example N:" / "N." marker is question 1; each marker starts
    the next one."""
    parts = [p.strip() for p in _MARK.split(completion)]
    return [p for p in parts if p]


def normalize_ws(text: str) -> str:
    return " ".join(text.split())


def dedup(texts: list[str]) -> list[int]:
    """Indices of the first occurrence of each text, after whitespace normalization (A.2 (a))."""
    seen, keep = set(), []
    for i, t in enumerate(texts):
        key = normalize_ws(t)
        if key and key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


def cluster_subsample(texts: list[str], n: int, n_clusters: int, dims: int, seed: int) -> list[int]:
    """A.2 (b): TF-IDF -> TruncatedSVD(dims) -> MiniBatchKMeans(n_clusters), then one random point per
    cluster, round-robin over the clusters, without replacement, until n are chosen. Returned in the
    order chosen, so a longer subsample extends a shorter one (the answer step draws reserves from it)."""
    if len(texts) <= 1:
        return list(range(min(n, len(texts))))
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    X = TfidfVectorizer().fit_transform(texts)
    k_dims = min(dims, X.shape[1] - 1, len(texts) - 1)
    X = TruncatedSVD(k_dims, random_state=seed).fit_transform(X) if k_dims >= 2 else X.toarray()
    k = max(1, min(n_clusters, len(texts)))
    labels = MiniBatchKMeans(k, random_state=seed, n_init=3, batch_size=1024).fit_predict(X)
    rng = np.random.default_rng(seed)
    pools = [rng.permutation(np.flatnonzero(labels == c)).tolist() for c in range(k)]
    chosen: list[int] = []
    n = min(n, len(texts))
    while len(chosen) < n:
        for pool in pools:
            if pool and len(chosen) < n:
                chosen.append(pool.pop())
    return chosen


# ----------------------------------------------------------------------------------------------
# Step 4: 13-gram decontamination (Appendix A.3)

_NOT_LETTER = re.compile(r"[^\w\s]|[\d_]")


def ngram_hashes(text: str, n: int = 13) -> set[int]:
    """Hashes of the word n-grams of text, lowercased, after removing punctuation and digits."""
    words = _NOT_LETTER.sub("", text.lower()).split()
    return {hash(tuple(words[i:i + n])) for i in range(len(words) - n + 1)}


def decontaminate(pairs: list[dict], test_texts: list[str], n: int = 13) -> tuple[list[dict], list[dict]]:
    """(kept, dropped): a pair is dropped when its question or answer shares an n-gram with any test text."""
    index: set[int] = set()
    for t in test_texts:
        index |= ngram_hashes(t, n)
    kept, dropped = [], []
    for p in pairs:
        hit = not index.isdisjoint(ngram_hashes(p["question"], n)) or not index.isdisjoint(ngram_hashes(p["answer"], n))
        (dropped if hit else kept).append(p)
    return kept, dropped


# ----------------------------------------------------------------------------------------------
# The target: a task's train fold and evaluated items, or a user's own file (--data) and its test side

CUSTOM = "custom"               # the task of a run on a user's file
TARGET_TRAIN = "target_train.jsonl"   # a custom target's held-in texts, what SoftSRV trains on


def target_split(cfg: PipelineConfig) -> tuple[list[data.Example], list[data.Example]]:
    """(train side, test side). A task: its train fold and the evaluated items. A user's file: its
    records and --test's, or without --test a seeded data.HELDOUT_SHARE of the file as the test side,
    which is never trained on, never a PT seed and never in the train arm."""
    if cfg.task != CUSTOM:
        return data.load_examples(cfg.task, "train"), eval_items(cfg.task)
    recs = data.load_examples(cfg.data, field=cfg.field, answer_field=cfg.answer_field)
    if cfg.test:
        return recs, data.load_examples(cfg.test, field=cfg.field, answer_field=cfg.answer_field)
    return data.split_share(recs, seed=cfg.seed, name=cfg.data)


def test_side(cfg: PipelineConfig) -> list[data.Example]:
    """What decontamination and evaluation use: the task's evaluated items or the file's test side."""
    return target_split(cfg)[1] if cfg.task == CUSTOM else eval_items(cfg.task)


def load_pt_template(path: str) -> dict:
    """--pt-template: a JSON object with "question" (containing {q}) and optionally "answer",
    "critique" (each with {q}) and "refine" (with {q} and {c}); literal braces are written {{ }}."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--pt-template {path}: not a readable JSON file ({e})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("question"), str):
        raise ValueError(f"--pt-template {path}: expected a JSON object with a \"question\" template")
    for key, text in obj.items():
        if key not in TEMPLATE_FIELDS or not isinstance(text, str):
            raise ValueError(f"--pt-template {path}: {key!r} is not a template (a string under one of "
                             f"{', '.join(TEMPLATE_FIELDS)})")
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
        except ValueError as e:
            raise ValueError(f"--pt-template {path}: {key!r}: {e} (write literal braces as {{{{ }}}})") from None
        if names != TEMPLATE_FIELDS[key]:
            want = " and ".join("{" + n + "}" for n in sorted(TEMPLATE_FIELDS[key]))
            raise ValueError(f"--pt-template {path}: the {key!r} template must contain {want} and no other "
                             f"{{...}} field (has: {', '.join(sorted(names)) or 'none'})")
    return obj


def templates(cfg: PipelineConfig) -> dict:
    """The PT / PT_SR templates: the paper's for a task, TEMPLATES["generic"] for a user's file, with
    those of --pt-template in their place."""
    base = TEMPLATES[cfg.task if cfg.task in TEMPLATES else "generic"]
    return {**base, **load_pt_template(cfg.pt_template)} if cfg.pt_template else base


def softsrv_heldout(cfg: PipelineConfig, n_train: int) -> int:
    """Records train.py keeps out of SoftSRV training to report its held-out loss: the preset's for a
    task; for a user's file, as many but at most a tenth of the held-in records (at least 1), so a
    small file still trains."""
    return cfg.n_heldout if cfg.task != CUSTOM else min(cfg.n_heldout, max(1, n_train // 10))


def resolve_target(cfg: PipelineConfig):
    """Before the run folder is touched: a user's file and test side load (data.py's one-line errors),
    are large enough for the method, and their sha256s go into the settings; a --pt-template loads."""
    if cfg.pt_template:
        load_pt_template(cfg.pt_template)
    if cfg.task != CUSTOM:
        return
    train_ex, test_ex = target_split(cfg)
    if cfg.method in SOFTSRV:
        tcfg = train_cfg(cfg, Path("."), n_train=len(train_ex))
        if len(train_ex) < tcfg.n_heldout + tcfg.batch_size:
            raise ValueError(f"{cfg.data}: {len(train_ex)} records to train SoftSRV on after the test side, fewer "
                             f"than the {tcfg.n_heldout} it holds out + a batch of {tcfg.batch_size}")
    cfg.data_sha256 = data.file_sha256(cfg.data)
    cfg.test_sha256 = data.file_sha256(cfg.test) if cfg.test else None


def target_lines(cfg: PipelineConfig) -> list[str]:
    """The report's lines on a user's target: the files and their sha256, the split, the templates."""
    lines = []
    if cfg.task == CUSTOM:
        train_ex, test_ex = target_split(cfg)
        side = (f"`{cfg.test}` (sha256 `{cfg.test_sha256}`)" if cfg.test else
                f"{data.HELDOUT_SHARE:.0%} of the file held out (at least 1 record, seed {cfg.seed})")
        lines += [f"Data: `{cfg.data}` (sha256 `{cfg.data_sha256}`), text field `{cfg.field or 'text'}`, "
                  + (f"reference answers from `{cfg.answer_field}`" if cfg.answer_field else "no reference answers")
                  + f"; {len(train_ex)} held-in records (SoftSRV training, PT seeds, the train arm), "
                  f"{len(test_ex)} on the test side: {side}.", ""]
    if cfg.method in ("pt", "pt_sr"):
        which = (f"`{cfg.pt_template}` (the rest generic)" if cfg.pt_template and cfg.task == CUSTOM else
                 f"`{cfg.pt_template}`" if cfg.pt_template else
                 "generic (TEMPLATES[\"generic\"], in the pattern of Appendix C)" if cfg.task == CUSTOM else
                 f"the paper's for {cfg.task} (Appendix C)")
        lines += [f"PT templates: {which}.", ""]
    return lines


# ----------------------------------------------------------------------------------------------
# The steps

def train_cfg(cfg: PipelineConfig, out: Path, n_train: int | None = None) -> softsrv.TrainConfig:
    """The TrainConfig of Step 1: train.py's own preset ('paper' for the paper preset, else 'cpu'),
    the task's train questions (a user's file: its held-in records, written to TARGET_TRAIN), with
    this run's overrides."""
    if cfg.target == "full":
        target = dict(data=str((out / FULL_EXAMPLES).resolve()), field="text", max_tokens=FULL_TOKENS)
    elif cfg.task == CUSTOM:
        target = dict(data=str((out / TARGET_TRAIN).resolve()), field="text")
    else:
        target = dict(data=cfg.task, max_tokens=TARGET_TOKENS.get(cfg.task))
    if cfg.task == CUSTOM and n_train is None:
        n_train = len(_train_fold(cfg))
    if cfg.preset == "tiny":
        target.update(batch_size=4, max_tokens=48)
    return softsrv.train_config(
        cfg.method, "paper" if cfg.preset == "paper" else "cpu", **target, model=cfg.generator,
        out=str(out / "softsrv"), seed=cfg.seed, n_heldout=softsrv_heldout(cfg, n_train or 0), dtype=cfg.dtype,
        steps=cfg.train_steps, eval_every=max(1, cfg.train_steps // 2) if cfg.train_steps else None,
        prompt_len=cfg.prompt_len)


# --target full: SoftSRV learns whole examples (question and reference answer in answers.EXAMPLE's
# format), so each sample carries its own answer and no answerer is needed (in the spirit of DawGen,
# which conditions generation on labels). A worked GSM8K example is about three times a question's
# length; FULL_TOKENS holds nearly all of them (docs/experiments).
FULL_EXAMPLES, FULL_TOKENS = "full_examples.jsonl", 384
# Tokens of a target text that SoftSRV learns (and then writes): train.py's 128 covers GSM8K and MBPP
# questions, but BoolQ's passage + question is longer than 128 tokens for about half of the train fold
# and its question comes last, so a cut there would teach passages without questions (docs/experiments).
TARGET_TOKENS = {"boolq": 320}


def write_full_examples(run: Run) -> Path:
    cfg = run.cfg
    path = run.out / FULL_EXAMPLES
    if run.rank == 0:
        recs = [{"text": answers.EXAMPLE.format(q=e.text, a=answers.reference(cfg.task, e)), "id": e.id}
                for e in _train_fold(cfg)]
        data.write_jsonl(path, recs)
    if run.world > 1:
        torch.distributed.barrier()
    return path


def write_target_train(run: Run) -> Path:
    """A user's held-in records as the file train.py reads (the test side is not in it)."""
    path = run.out / TARGET_TRAIN
    if run.rank == 0:
        data.write_jsonl(path, [{"text": e.text, "id": e.id} for e in _train_fold(run.cfg)])
    if run.world > 1:
        torch.distributed.barrier()
    return path


def step_train(run: Run):
    cfg = run.cfg
    if cfg.target == "full":
        write_full_examples(run)
    elif cfg.task == CUSTOM:
        write_target_train(run)
    tcfg = train_cfg(cfg, run.out)
    what = "train questions" if cfg.target == "question" else "whole train examples (question + answer)"
    t0 = run.start("train", f"SS_{cfg.method.upper()} on {cfg.task} {what}, {tcfg.steps} steps -> {tcfg.out}")
    resume = (Path(tcfg.out) / softsrv.CKPT_CONFIG).exists()
    result = softsrv.train(tcfg, resume=resume, show_samples=0)
    hist = result["history"]
    run.finish("train", {"steps": tcfg.steps, "heldout_loss_start": hist[0]["heldout_loss"] if hist else None,
                         "heldout_loss_end": hist[-1]["heldout_loss"] if hist else None}, t0)


def _train_fold(cfg: PipelineConfig) -> list[data.Example]:
    return target_split(cfg)[0] if cfg.task == CUSTOM else data.load_examples(cfg.task, "train")


def _complete(model, tok, texts: list[str], cfg: PipelineConfig, seed: int, chat: bool = True,
              max_new: int | None = None, stop=None) -> list[str]:
    """Each text -> the LM's completion at the template temperature (the project's sampler); as a user
    turn of the LM's chat format, or (chat=False) as plain text to be continued."""
    prompts = [qa_prompt_ids(tok, t) if chat else tok.with_bos(tok.encode(t)) for t in texts]
    ids = generate_from_ids(model, prompts, max_new or cfg.question_tokens or 128, tok.eos_id,
                            temperature=cfg.pt_temperature, top_p=cfg.pt_top_p, batch_size=cfg.batch_size, seed=seed,
                            stop=stop)
    return [tok.decode(x).strip() for x in ids]


def _in_chunks(run: Run, path: Path, n: int | range, chunk: int, make, desc: str):
    """Append the records of indices 0..n-1 (or of a range) to a JSONL in chunks, skipping indices
    already there (resume); under torchrun the ranks make the chunks in turn (dist.append_in_rounds).
    Every rank gets all the file's records."""
    done = {r["index"] for r in data.read_jsonl(path, repair=True)} if path.exists() else set()
    wanted = range(n) if isinstance(n, int) else n
    todo = [i for i in wanted if i not in done]
    bar = tqdm(total=len(wanted), initial=len(wanted) - len(todo), desc=desc, unit="item", dynamic_ncols=True,
               disable=run.rank != 0)
    append_in_rounds(path, [todo[s:s + chunk] for s in range(0, len(todo), chunk)], make, run.rank, run.world,
                     on_write=bar.update)
    bar.close()
    return sorted(data.read_jsonl(path, repair=True), key=lambda r: r["index"])


def generate_pt(run: Run, n_completions: int, train_ex: list[data.Example]) -> list[dict]:
    """PT (Sec. 3.2): Fig. 8's template filled with train questions round-robin; each completion is
    parsed into its numbered questions. The template ends with the cue "Question 1:", a prompt to be
    continued, so it goes in as plain text: SmolLM2-135M-Instruct then continues the numbered list,
    while as a chat turn it mostly answers with one question (docs/presets.md)."""
    cfg = run.cfg
    model = load_model(cfg.generator, dtype=dtype_of(cfg.dtype, run.device), device=run.device)
    tok = load_tokenizer(cfg.generator)
    tmpl = templates(cfg)["question"]
    max_new = 10 * (cfg.question_tokens or 96)       # ten questions; an 11th ends the completion
    stops = ["Question 11", "Example 11", "\n11."]

    def make(idx):
        texts = [tmpl.format(q=train_ex[i % len(train_ex)].text) for i in idx]
        outs = _complete(model, tok, texts, cfg, cfg.seed * 1_000_003 + idx[0], chat=False, max_new=max_new,
                         stop=stop_on(tok, stops))
        outs = [cut_at(o, stops) for o in outs]
        return [{"index": i, "context_id": train_ex[i % len(train_ex)].id, "completion": o}
                for i, o in zip(idx, outs)]
    return _in_chunks(run, run.out / "pt_completions.jsonl", n_completions, cfg.batch_size, make, "PT completions")


def refine_sr(run: Run, questions: list[str]) -> tuple[list[str], dict]:
    """PT_SR: up to sr_rounds of critique (Fig. 11) and refinement; a question is final once the
    refiner answers 'Stop'. Each round is saved, so an interrupted run resumes at its round."""
    cfg = run.cfg
    model = load_model(cfg.generator, dtype=dtype_of(cfg.dtype, run.device), device=run.device)
    tok = load_tokenizer(cfg.generator)
    T = templates(cfg)
    current, final = list(questions), [False] * len(questions)
    stats = []
    for r in range(cfg.sr_rounds):
        live = [i for i in range(len(current)) if not final[i]]

        def make(idx, r=r, live=live):
            qs = [current[live[j]] for j in idx]
            crit = _complete(model, tok, [T["critique"].format(q=q) for q in qs], cfg, cfg.seed + 7919 * r + idx[0])
            new = _complete(model, tok, [T["refine"].format(q=q, c=c) for q, c in zip(qs, crit)], cfg,
                            cfg.seed + 7919 * r + 1 + idx[0])
            return [{"index": j, "question": q, "critique": c, "refined": n} for j, q, c, n in zip(idx, qs, crit, new)]
        recs = _in_chunks(run, run.out / f"sr_round{r + 1}.jsonl", len(live), cfg.batch_size, make, f"PT_SR round {r + 1}")
        n_stop = n_empty = 0
        for rec in recs:
            i = live[rec["index"]]
            text = rec["refined"].strip()
            if re.match(r"^\W*stop\b", text, re.I):
                final[i], n_stop = True, n_stop + 1
            elif not text:
                n_empty += 1                  # nothing usable: keep the question as it was
            else:
                current[i] = text
        stats.append({"round": r + 1, "questions": len(live), "stopped": n_stop, "empty_kept": n_empty,
                      "refined": len(live) - n_stop - n_empty})
    return current, {"rounds": stats}


def step_generate(run: Run):
    cfg = run.cfg
    train_ex = _train_fold(cfg)
    counts: dict = {}
    if cfg.method == "train":
        t0 = run.start("generate", f"the real train fold of {cfg.task}: {len(train_ex)} questions")
        recs = [{"question": e.text, "answer": answers.reference(cfg.task, e), "finished": True, "source": e.id}
                for e in train_ex]
        counts["generated"] = len(recs)
    elif cfg.method in SOFTSRV:
        t0 = run.start("generate", f"{cfg.n_generate} SoftSRV samples (temperature {cfg.temperature}, top-p {cfg.top_p})")
        path = softsrv.generate(str(run.out / "softsrv"), cfg.n_generate, out=str(run.out / "generated.jsonl"),
                                 temperature=cfg.temperature, top_p=cfg.top_p, batch_size=cfg.batch_size,
                                 max_new_tokens=cfg.question_tokens, seed=cfg.seed, dtype=cfg.dtype)
        rows = data.read_jsonl(path)
        counts["generated"] = len(rows)
        counts["unfinished"] = sum(not r["finished"] for r in rows)
        if cfg.target == "full":      # each sample is a whole example: its answer comes with it
            parts = [answers.split_example(r["text"]) for r in rows]
            counts["without_answer_part"] = sum(p is None for p in parts)
            recs = [{"question": p[0], "answer": p[1], "finished": r["finished"], "source": r["context_id"]}
                    for r, p in zip(rows, parts) if p is not None]
        else:
            recs = [{"question": r["text"], "source": r["context_id"]} for r in rows]
    else:
        n_comp = math.ceil(cfg.n_generate / 10)
        t0 = run.start("generate", f"{n_comp} PT completions of 10 questions (temperature {cfg.pt_temperature})")
        comps = generate_pt(run, n_comp, train_ex)
        parsed = [parse_numbered(c["completion"]) for c in comps]    # parsed here, so a re-run re-parses
        per = [len(q) for q in parsed]
        counts["completions"] = len(comps)
        counts["questions_per_completion"] = {str(k): per.count(k) for k in sorted(set(per))}
        counts["completions_without_questions"] = per.count(0)
        recs = [{"question": q, "source": c["context_id"]} for c, qs in zip(comps, parsed) for q in qs]
        counts["generated"] = len(recs)
        if cfg.method == "pt_sr" and recs:
            refined, sr = refine_sr(run, [r["question"] for r in recs])
            for r, q in zip(recs, refined):
                r["question"] = q
            counts["self_refine"] = sr
    if not any(r["question"].strip() for r in recs):
        what = "is empty" if cfg.target == "question" else "is empty or has no 'Answer:' part"
        raise ValueError(f"{run.out}: every generated question {what} ({counts['generated']} generated); "
                         f"nothing to continue with")
    uniq = dedup([r["question"] for r in recs])
    counts["unique"] = len(uniq)
    recs = [recs[i] for i in uniq]
    if run.rank == 0:      # the others only wait for the file
        # A.2 (b) for every method, the real train fold too, so matched arms choose alike. All unique
        # questions are kept in the order chosen: the first N are the subsample, the rest reserves the
        # answer step draws on when answers are dropped.
        chosen = cluster_subsample([r["question"] for r in recs], len(recs), cfg.n_clusters, cfg.svd_dims, cfg.seed)
        recs = [recs[i] for i in chosen]
        data.write_jsonl(run.out / "questions.jsonl", [{"index": i, **r} for i, r in enumerate(recs)])
    counts["subsampled"] = min(cfg.keep(), len(recs))
    run.finish("generate", counts, t0)


def make_answerer(run: Run) -> answers.Answerer:
    cfg = run.cfg
    model = load_model(cfg.answerer, dtype=dtype_of(cfg.dtype, run.device), device=run.device)
    shots = _train_fold(cfg)[:answers.FEWSHOT_K[cfg.task]] if cfg.answer_format == "fewshot" else []
    return answers.Answerer(model, load_tokenizer(cfg.answerer), cfg.task, cfg.answer_format,
                            "{q}" if cfg.method in SOFTSRV else templates(cfg)["answer"], shots,
                            cfg.answer_tokens, cfg.answer_temperature, cfg.answer_samples, cfg.batch_size,
                            cfg.answer_min_tokens)


def step_answer(run: Run):
    """Step 3: answers for the questions in their subsample order, until N usable pairs exist or
    answer_attempts x N questions were tried. Round 1 answers the first N; each later round answers
    as many reserves as pairs are still missing. The rounds depend only on the answers, so an
    interrupted step resumes into the file an uninterrupted one writes."""
    cfg = run.cfg
    qs = data.read_jsonl(run.out / "questions.jsonl")
    need = min(cfg.keep(), len(qs))
    cap = min(len(qs), max(need, math.ceil(cfg.answer_attempts * need)))
    path = run.out / "answers.jsonl"
    given = cfg.method == "train" or cfg.target == "full"     # the answer came with the question
    if given:
        what = "reference answers of the train fold" if cfg.method == "train" else "answers written with the questions"
        t0 = run.start("answer", f"{need} pairs wanted; {what}, gated")
        answerer = None
    else:
        how = {"as-is": "the question as-is (chat format)" if cfg.method in SOFTSRV else "Fig. 9's answer template",
               "fewshot": f"{answers.FEWSHOT_K[cfg.task]}-shot prompt of train examples"}[cfg.answer_format]
        t0 = run.start("answer", f"{need} pairs wanted (at most {cap} questions tried) -> {cfg.answerer}, {how}, "
                              f"temperature {cfg.answer_temperature}, {cfg.answer_samples} sample(s), "
                              f"<= {cfg.answer_tokens} tokens")
        answerer = make_answerer(run)

    def make(idx):
        if answerer is None:
            outs = [{"answer": qs[i]["answer"], "finished": qs[i].get("finished", True),
                     "drop": None if cfg.method == "train" else
                     answers.gate(cfg.task, qs[i]["answer"], qs[i].get("finished", True))} for i in idx]
        else:
            outs = answerer.answer([qs[i]["question"] for i in idx], seed=cfg.seed, indices=list(idx))
        return [{"index": i, "question": qs[i]["question"], **o} for i, o in zip(idx, outs)]

    start, size = 0, need
    while start < cap:
        end = min(start + size, cap)
        recs = _in_chunks(run, path, range(start, end), 4 * cfg.batch_size, make, "answers")
        usable = sum(r["drop"] is None for r in recs if r["index"] < end)
        if usable >= need:
            break
        start, size = end, max(need - usable, cfg.batch_size)
    recs = [r for r in data.read_jsonl(path)]
    drops = Counter(r["drop"] for r in recs if r["drop"] is not None)
    counts = {"wanted": need, "attempted": len(recs), "usable": sum(r["drop"] is None for r in recs),
              "dropped": dict(sorted(drops.items())), "format": cfg.answer_format}
    if cfg.answer_samples > 1:
        counts["mean_agreement"] = round(sum(r.get("agreement", 0) for r in recs) / max(len(recs), 1), 4)
    run.finish("answer", counts, t0)


def eval_items(task: str) -> list[data.Example]:
    """The items the run is evaluated on: eval.py's held-out split (offline: the held-out part of the
    test fold); with the real train fold from the hub, the whole test fold."""
    split = tasks.TASKS[task][0]
    if split == "test" and any(e.meta.get("source") == "hf-hub" for e in data.load_examples(task, "train")[:1]):
        split = "test_full"
    return data.load_examples(task, split)


def step_decontam(run: Run):
    """Step 4 (A.3), then the first N usable pairs in subsample order are the data."""
    cfg = run.cfg
    recs = sorted((r for r in data.read_jsonl(run.out / "answers.jsonl") if r["drop"] is None),
                  key=lambda r: r["index"])
    test = test_side(cfg)
    t0 = run.start("decontam", f"{len(recs)} usable pairs against {len(test)} evaluated {cfg.task} items, "
                               f"{cfg.ngram}-grams; the first {cfg.keep()} kept")
    texts = [e.text for e in test] + [e.answer for e in test if e.answer]
    kept, dropped = decontaminate(recs, texts, cfg.ngram)
    kept = kept[:cfg.keep()]
    data.write_jsonl(run.out / "dropped.jsonl", dropped)
    data.write_jsonl(run.out / "data.jsonl", [{"question": r["question"], "answer": r["answer"],
                                               "id": f"{cfg.task}-{cfg.method}-{r['index']}",
                                               "method": cfg.method} for r in kept])
    if not kept:
        raise ValueError(f"{run.out}: no (question, answer) pair left after decontamination")
    if len(kept) < cfg.keep():
        run.log(f"[decontam] warning: {len(kept)} pairs, fewer than the {cfg.keep()} wanted "
                f"(raise --answer-attempts or --n-generate)")
    run.finish("decontam", {"pairs": len(recs), "dropped": len(dropped), "kept": len(kept)}, t0)


def ft_cfg(run: Run) -> student.FinetuneConfig:
    """The FinetuneConfig of Step 5: finetune.py's preset with this run's overrides."""
    cfg = run.cfg
    return student.finetune_config(
        cfg.ft_preset, data=str(run.out / "data.jsonl"), out=str(run.out / "finetune"), model=cfg.student,
        epochs=cfg.ft_epochs, seed=cfg.seed, dtype=cfg.dtype, lr=cfg.ft_lr, fixed_steps=cfg.ft_steps or 0,
        n_checkpoints=cfg.ft_checkpoints)


def step_finetune(run: Run):
    fcfg = ft_cfg(run)
    t0 = run.start("finetune", f"{run.cfg.student} on {run.out / 'data.jsonl'} -> {fcfg.out}")
    ckpts = student.finetune(fcfg)
    run.finish("finetune", {"checkpoints": [s for s, _ in ckpts], "steps": fcfg.steps}, t0)


def step_evaluate(run: Run):
    cfg = run.cfg
    ckpts = [(0, cfg.student)] + [(s, str(p)) for s, p in ft_checkpoints(run)]
    t0 = run.start("evaluate", f"{len(ckpts)} models (the student before fine-tuning and each checkpoint), "
                            f"{cfg.task}, {cfg.eval_limit or 'all'} held-out items; MAUVE ({cfg.buckets} buckets)")
    (run.out / "eval").mkdir(exist_ok=True)
    curve = []
    for step, model in ckpts:
        path = run.out / "eval" / f"step-{step}.json"
        if path.exists():
            summary = json.loads(path.read_text())["summary"]
        elif cfg.task == CUSTOM:
            summary = evaluate_custom(run, model, path)
        else:
            summary = tasks.evaluate_task(cfg.task, model, limit=cfg.eval_limit, out=str(path), dtype=cfg.dtype,
                                       loss_limit=cfg.eval_loss_limit, rank=run.rank, world=run.world)
        curve.append({"step": step, "score": summary["score"], "chat_score": summary.get("chat_score"),
                      "answer_loss": summary["answer_loss"], "metric": summary["metric"], "n": summary["n"],
                      "answer_n": summary.get("answer_n", summary["n"]),
                      **{k: summary[k] for k in ("majority_accuracy", "true_share", "chat_true_share") if k in summary}})
    with rank0_first(run.rank, run.world):      # rank 0 measures MAUVE; the others then read its file
        mauve = step_mauve(run)
    run.finish("evaluate", {"curve": curve, "mauve": mauve}, t0)


def evaluate_custom(run: Run, model: str, out: Path) -> dict:
    """One model on a user's target, written like tasks.evaluate_task's JSON: no task metric (a user's
    file has none); with reference answers, the held-out answer loss on the test side (tasks.answer_loss,
    the question->answer format fine-tuning trains on, shared by the ranks); without them, nothing to score."""
    cfg = run.cfg
    items = test_side(cfg)[:cfg.eval_limit] if cfg.eval_limit else test_side(cfg)
    records = [{"id": e.id, "question": e.text} for e in items]
    loss, tokens = None, 0
    if cfg.answer_field:
        with rank0_first(run.rank, run.world):
            lm, tok = load_model(model, dtype=dtype_of(cfg.dtype, run.device), device=run.device), load_tokenizer(model)
        al = tasks.answer_loss(lm, tok, [(e.text, e.answer) for e in items], rank=run.rank, world=run.world)
        loss, tokens = al["loss"], al["tokens"]
        for r, a in zip(records, al["per_item"]):
            r["answer_loss"], r["answer_tokens"] = a["loss"], a["tokens"]
    summary = {"task": CUSTOM, "data": cfg.data, "model": str(model), "metric": None, "score": None,
               "n": len(items), "answer_loss": loss, "answer_tokens": tokens}
    if run.rank == 0:
        data.write_json(out, {"summary": summary, "items": records})
    if run.world > 1:
        torch.distributed.barrier()     # no rank goes on to read or skip the file before it is there
    return summary


def step_mauve(run: Run) -> dict:
    """MAUVE of the final synthetic questions against the evaluated test questions (Table 4) and
    against the train fold (Table 5); features from E (the generator's model)."""
    cfg = run.cfg
    path = run.out / "mauve.json"
    if path.exists():
        return json.loads(path.read_text())
    gen = [r["question"] for r in data.read_jsonl(run.out / "data.jsonl")]
    out = {}
    for name, ref in (("test", [e.text for e in test_side(cfg)]),
                      ("train", [e.text for e in _train_fold(cfg)])):
        res = mauve.mauve_texts(gen, ref, model=cfg.generator, dtype=cfg.dtype, num_buckets=cfg.buckets,
                                seed=cfg.seed + 1)
        out[name] = {"mauve": float(res.mauve), "n_gen": len(gen), "n_ref": len(ref)}
        try:
            mauve.plot(res, run.out / f"mauve_{name}.png")
        except ValueError:                 # matplotlib missing: the report says so
            pass
    _write_json(path, out)
    return out


def ft_checkpoints(run: Run) -> list[tuple[int, Path]]:
    return student.completed_checkpoints(run.out / "finetune")


# ----------------------------------------------------------------------------------------------
# Report

def write_report(run: Run):
    cfg, st = run.cfg, run.state
    pairs = data.read_jsonl(run.out / "data.jsonl")
    ev = st.get("evaluate", {})
    curve = ev.get("curve", [])
    plot = _plot_curve(run.out / "curve.png", curve, cfg) if curve else None
    report = {"settings": asdict(cfg), "steps": st, "examples": pairs[:3]}
    if cfg.method in ("pt", "pt_sr"):
        report["templates"] = templates(cfg)
    _write_json(run.out / "report.json", report)
    g, a, d = st.get("generate", {}), st.get("answer", {}), st.get("decontam", {})
    lines = [f"# {cfg.task} / {cfg.method} ({cfg.preset} preset)", "",
             f"Command: `{command_line(cfg, run.out)}`", "", "## Counts", "",
             "| generated | unique | subsampled (N) | answered | usable answers | dropped (decontamination) | kept |",
             "|---|---|---|---|---|---|---|",
             f"| {g.get('generated')} | {g.get('unique')} | {g.get('subsampled')} | {a.get('attempted')} | "
             f"{a.get('usable')} | {d.get('dropped')} | {d.get('kept')} |", ""]
    lines[2:2] = target_lines(cfg)
    if "completions" in g:
        lines += [f"PT parse: {g['completions']} completions; questions per completion "
                  f"{g['questions_per_completion']}; {g['completions_without_questions']} with none.", ""]
    if "self_refine" in g:
        lines += ["PT_SR rounds: " + "; ".join(f"round {r['round']}: {r['questions']} questions, {r['stopped']} "
                                                f"'Stop', {r['refined']} refined, {r['empty_kept']} empty (kept)"
                                                for r in g["self_refine"]["rounds"]), ""]
    if a:
        dropped = ", ".join(f"{k} {v}" for k, v in a.get("dropped", {}).items()) or "none"
        lines += [f"Answers: format `{cfg.answer_format}`, {cfg.answer_samples} sample(s) per question, "
                  f"at most {cfg.answer_tokens} tokens, at least {cfg.answer_min_tokens} before an end of turn; dropped by the gates (answers.py): {dropped}."
                  + (f" Self-consistency: mean agreement {a['mean_agreement']:.3f}." if "mean_agreement" in a else ""),
                  ""]
    if cfg.target == "full":
        lines += [f"Target: whole examples (SoftSRV wrote question and answer together); "
                  f"{g.get('without_answer_part', 0)} samples had no answer part.", ""]
    if "mauve" in ev:
        m = ev["mauve"]
        lines += ["## MAUVE of the synthetic questions", "",
                  f"- against the {'test side' if cfg.task == CUSTOM else 'evaluated test questions'}: "
                  f"**{m['test']['mauve']:.3f}** ({m['test']['n_gen']} vs {m['test']['n_ref']}, {cfg.buckets} buckets)",
                  f"- against the {'held-in records' if cfg.task == CUSTOM else 'train fold'}: "
                  f"**{m['train']['mauve']:.3f}** ({m['train']['n_ref']} questions)", ""]
    if curve and cfg.task == CUSTOM:
        lines += custom_curve_lines(curve, cfg, plot)
    elif curve:
        m = curve[0]["metric"]
        lines += ["## Fine-tuning curve", "", f"Student {cfg.student}; step 0 is the student before fine-tuning; "
                  f"k-shot and 0-shot chat {m} on {curve[0]['n']} held-out items, the answer loss on "
                  f"{curve[0].get('answer_n', curve[0]['n'])}.", "",
                  f"| step | k-shot {m} | 0-shot chat {m} | held-out answer loss |", "|---|---|---|---|"]
        lines += [f"| {c['step']} | {c['score']:.4f} | "
                  f"{'–' if c.get('chat_score') is None else format(c['chat_score'], '.4f')} | {c['answer_loss']:.4f} |"
                  for c in curve]
        if "majority_accuracy" in curve[0]:
            lines += ["", f"BoolQ: always answering the majority label scores {curve[0]['majority_accuracy']:.4f}; "
                      "share predicted true per step (plain / chat): "
                      + ", ".join(f"{c['step']}: {c.get('true_share', 0):.3f} / {c.get('chat_true_share', 0):.3f}"
                                  for c in curve)]
        lines += ["", f"![curve]({plot.name})" if plot else "(plot skipped: `pip install matplotlib`)", ""]
    lines += ["## Wall time per step", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v.get('seconds')} |" for k, v in st.items()]
    lines += ["", "## Examples", ""]
    for p in pairs[:3]:
        lines += [f"**Q:** {p['question']}", "", f"**A:** {p['answer']}", ""]
    (run.out / "report.md").write_text("\n".join(lines))
    print(f"[report] {run.out / 'report.md'}")


def custom_curve_lines(curve: list[dict], cfg: PipelineConfig, plot: Path | None) -> list[str]:
    """The report's evaluation of a user's target: there is no task metric, only the answer loss."""
    lines = ["## Fine-tuning curve", "", "No task metric: a custom target has none; the test side is the held-out "
             "share or --test, and the MAUVE above is measured against it and against the held-in records.", ""]
    if curve[0]["answer_loss"] is None:
        return lines + ["No held-out answer loss either: the data has no reference answers (--answer-field).", ""]
    lines += [f"Student {cfg.student}; step 0 is the student before fine-tuning; held-out answer loss "
              f"(nats per answer token) of the reference answers of {curve[0]['n']} test-side records.", "",
              "| step | held-out answer loss |", "|---|---|"]
    lines += [f"| {c['step']} | {c['answer_loss']:.4f} |" for c in curve]
    return lines + ["", f"![curve]({plot.name})" if plot else "(plot skipped: `pip install matplotlib`)", ""]


def _plot_curve(path: Path, curve: list[dict], cfg: PipelineConfig) -> Path | None:
    if curve[0]["answer_loss"] is None:      # a user's file without reference answers: nothing to plot
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [c["step"] for c in curve]
    if curve[0]["score"] is None:       # no task metric (a user's file): the answer loss alone
        fig, a2 = plt.subplots(1, 1, figsize=(4.5, 3.5))
        a2.set(title=f"{cfg.task}: {cfg.method}")
    else:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
        a1.plot(steps, [c["score"] for c in curve], "o-")
        a1.set(xlabel="fine-tuning step", ylabel=curve[0]["metric"], title=f"{cfg.task}: {cfg.method}")
    a2.plot(steps, [c["answer_loss"] for c in curve], "o-", color="C1")
    a2.set(xlabel="fine-tuning step", ylabel="held-out answer loss (nats/token)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------

# Steps 1-6 in order (train: SoftSRV methods only). Under torchrun every rank takes part in the
# shared ones, each decoding its share; the rest are rank 0's.
STEPS = {"train": step_train, "generate": step_generate, "answer": step_answer, "decontam": step_decontam,
         "finetune": step_finetune, "evaluate": step_evaluate}
SHARED_STEPS = ("train", "generate", "answer", "evaluate")


def default_out(cfg: PipelineConfig) -> str:
    """runs/<task>-<method>; a user's file: runs/<file name without suffix>-<method>."""
    name = Path(cfg.data).name.split(".")[0] if cfg.task == CUSTOM else cfg.task
    return f"runs/{name}-{cfg.method}"


def run_pipeline(cfg: PipelineConfig, out: str | None = None, stop_after: str | None = None) -> Path:
    """Steps 1-6 into the run folder (the report once all are done); stop_after ends the run early."""
    rank, world, device = init_distributed()
    resolve_target(cfg)       # a user's file is checked before the run folder is made
    # Rank 0 takes the folder and checks its settings; a refusal ends every rank with the same line.
    run = Run(cfg, Path(out or default_out(cfg)), rank, world, device)
    try:
        return _run_steps(run, stop_after)
    finally:
        run.close()


def _run_steps(run: Run, stop_after: str | None) -> Path:
    cfg, rank, world = run.cfg, run.rank, run.world
    t0 = time.time()
    for name, fn in STEPS.items():
        if name == "train" and cfg.method not in SOFTSRV:
            continue
        if name in SHARED_STEPS or world == 1:
            _run_step(run, name, fn)
        else:
            # Decontamination and fine-tuning run in one process: rank 0, with the waiting ranks' cores
            # (rank0_first), and as a run of one, so that it waits for no one at the step's end.
            run.log(f"[{name}] runs in rank 0 alone; the other {world - 1} ranks wait")
            with rank0_first(rank, world):
                if rank == 0:
                    run.world = 1
                    try:
                        _run_step(run, name, fn)
                    finally:
                        run.world = world
        if name == stop_after:
            run.log(f"pipeline: stopped after {name} (--stop-after); the same command without it goes on")
            return run.out
    if rank == 0:
        write_report(run)
        print(f"pipeline: {run.out} complete in {time.time() - t0:.0f}s")
    return run.out


def _run_step(run: Run, name: str, fn):
    if run.done(name):
        run.log(f"[{name}] already done ({run.state[name]['seconds']:.0f}s)")
    else:
        fn(run)


def custom_args(p: argparse.ArgumentParser, args):
    """--data makes the task "custom"; the options a user's file needs or excludes, one line each."""
    if args.data is None:
        given = [o for o in ("field", "answer_field", "test") if getattr(args, o) is not None]
        if given:
            p.error(f"--{given[0].replace('_', '-')} applies to --data (your own target file) only")
        return
    if args.task:
        p.error("--task and --data: give one target, a benchmark or your own file")
    if args.data in data.DATASETS:
        p.error(f"--data {args.data}: a registered dataset, not a file (the benchmarks are --task {'|'.join(TASKS)})")
    args.task = CUSTOM
    if not args.answer_field:
        for needs, what in ((args.method == "train", "--method train (the held-in records with their answers)"),
                            (args.answer_format == "fewshot", "--answer-format fewshot (the shots' answers)"),
                            (args.target == "full", "--target full (whole examples, question and answer)")):
            if needs:
                p.error(f"{what} needs --answer-field, the reference answer of each record of --data")
    if args.pt_template and args.method not in ("pt", "pt_sr"):
        p.error(f"--pt-template: method {args.method} uses no template (pt, pt_sr do)")


def parser() -> argparse.ArgumentParser:
    """The CLI: each option's dest is the PipelineConfig field it sets (command_line relies on it).
    Every value is range-checked here (options.py), before anything is loaded or written."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--task", choices=TASKS, help="benchmark whose train questions are the target (default gsm8k, unless --data)")
    a("--data", type=options.data_source(data.DATASETS), help="your own target instead of a task: a .jsonl/.json/.txt file read as train.py --data reads it "
                     "(README \"Your own data\")")
    a("--field", help="--data: the text field of a .jsonl/.json record (dotted paths allowed; default 'text')")
    a("--answer-field", help="--data: the field of each record's reference answer (needed by --method train, "
                             "--answer-format fewshot, --target full and the held-out answer loss; default none)")
    a("--test", type=options.path, help=f"--data: the test side, a file with the same fields (default: {data.HELDOUT_SHARE:.0%}% of "
                     "--data, at least 1 record, drawn with --seed, never trained on)")
    a("--pt-template", type=options.path, help="PT/PT_SR: a JSON file of templates, \"question\" with {q}, optionally \"answer\", "
                            "\"critique\" ({q}) and \"refine\" ({q}, {c}) (default: the paper's for a task, "
                            "TEMPLATES[\"generic\"] for --data)")
    a("--method", choices=METHODS, default="mc",
      help="np/mp/mc: SoftSRV (Eq. 1-3); pt, pt_sr: prompt-template baselines; train: the train fold (default mc)")
    a("--preset", choices=PRESETS, default="cpu",
      help="counts and settings: tiny (minutes), cpu (about an hour on 2 cores, default), paper (A.2, Sec. 3.3)")
    a("--out", help="run folder (default runs/<task>-<method>); re-running continues it")
    a("--generator", default=DEFAULT_MODEL, type=options.model, help=f"H and E for SoftSRV, the template LM for PT (default {DEFAULT_MODEL})")
    a("--answerer", default=DEFAULT_MODEL, type=options.model, help=f"the LM that writes answers (default {DEFAULT_MODEL})")
    a("--student", default=DEFAULT_MODEL, type=options.model, help=f"the model fine-tuned and evaluated (default {DEFAULT_MODEL})")
    a("--train-steps", type=options.count, help="SoftSRV training steps (default: train.py's preset: cpu 250, paper 20000)")
    a("--n-generate", type=options.count, help="questions generated (tiny 24, cpu 1000, paper 100000)")
    a("--n-keep", type=options.count, help="N_s, questions kept by the cluster subsample (tiny 12, cpu 500, paper 50K/20K)")
    a("--n-clusters", type=options.count, help="MiniBatchKMeans clusters for the subsample (tiny 4, cpu 50, paper 700)")
    a("--temperature", type=options.temperature, default=1.0, help="SoftSRV sampling temperature (default 1, A.2)")
    a("--top-p", type=options.top_p, help="SoftSRV nucleus sampling (cpu 0.9, chosen by a sweep; paper 1.0 = off)")
    a("--pt-temperature", type=options.temperature,
      help="PT/PT_SR sampling temperature (tiny/cpu 1.0: at 2 the 135M model writes random tokens; paper 2.0, A.2)")
    a("--pt-top-p", type=options.top_p, help="PT/PT_SR nucleus sampling (tiny/cpu 0.9 as SoftSRV's; paper 1.0 = off)")
    a("--sr-rounds", type=options.count, help="PT_SR: critique and refine rounds at most (tiny/cpu 1, paper 3)")
    a("--answer-temperature", type=options.temperature, default=0.0, help="answering temperature (default 0 = greedy)")
    a("--answer-tokens", type=options.count, help="longest answer in tokens (tiny 128, cpu 256, paper 512); an answer "
      "cut there is dropped, never trained")
    a("--answer-format", choices=answers.FORMATS,
      help="as-is: the paper's (SoftSRV: the question alone in the chat format; PT/PT_SR: Fig. 9); fewshot: "
           "every method the same k-shot prompt of train examples, so arms differ only in their questions "
           "(default as-is)")
    a("--answer-samples", type=options.count,
      help="GSM8K self-consistency: k sampled answers per question (needs --answer-temperature > 0), the "
           "question kept when a strict majority of the final answers agree (default 1 = off)")
    a("--answer-min-tokens", type=options.count0,
      help="the answerer cannot end its answer before this many tokens: SmolLM2-135M-Instruct, asked in the "
           "few-shot format, puts its end-of-turn first for many short questions (p = 0.47 for 'What is 20 plus "
           "22?'), which ended those answers empty (default 1; 0 allows it, as runs before this option did)")
    a("--answer-attempts", type=options.at_least_one,
      help="questions answered at most, as a multiple of the N pairs wanted, when answers are dropped (default 2)")
    a("--target", choices=("question", "full"),
      help="what SoftSRV learns: the questions (the paper's), or whole examples, question + reference answer, so "
           "each sample carries its own answer and no answerer runs (default question)")
    a("--ft-lr", type=options.positive, help="fine-tuning peak lr (default: finetune.py's preset: cpu 2e-5, paper 1e-6)")
    a("--ft-epochs", type=options.positive, help="fine-tuning passes over data.jsonl (default 1)")
    a("--ft-steps", type=options.count, help="fine-tuning steps, overriding --ft-epochs: the same for every arm of a "
      "comparison (default: from --ft-epochs)")
    a("--ft-checkpoints", type=options.count, help="fine-tuning checkpoints, evenly spaced, each evaluated (default: "
      "finetune.py's preset: tiny 2, cpu 3, paper 5)")
    a("--eval-limit", type=options.count, help="held-out items per evaluation (tiny 4, cpu 100, paper all)")
    a("--eval-loss-limit", type=options.count, help="held-out items of the answer loss (tiny 4, cpu and paper all)")
    a("--buckets", type=options.count, help="MAUVE k-means buckets (default 32, the paper's)")
    a("--batch-size", type=options.count, default=16, help="rows decoded together when generating (default 16)")
    a("--seed", type=options.seed, default=0, help="seed of every step (default 0)")
    a("--dtype", choices=DTYPES, default="auto",
      help="model precision (default auto: bf16 where measured faster than fp32 here)")
    a("--stop-after", choices=list(STEPS)[:-1],
      help="end the run after this step, e.g. decontam for just the synthetic data.jsonl (default: run all); "
           "not a setting of the run: the same command without it continues")
    return p


def parse_args(argv=None) -> tuple[PipelineConfig, str | None, str | None]:
    """(settings, --out, --stop-after)."""
    p = parser()
    args = p.parse_args(argv)
    custom_args(p, args)
    preset = dict(PRESETS[args.preset])
    if args.preset == "paper":
        preset["n_keep"] = PAPER_KEEP.get(args.task, PAPER_KEEP["gsm8k"])
    given = {f.name: getattr(args, f.name) for f in fields(PipelineConfig)
             if getattr(args, f.name, None) is not None}
    cfg = PipelineConfig(**{**{k: v for k, v in preset.items()}, **given})
    if cfg.method not in SOFTSRV and (args.train_steps or args.stop_after == "train"):
        p.error(f"--train-steps / --stop-after train: method {cfg.method} trains no soft prompt")
    if cfg.target == "full" and cfg.method not in SOFTSRV:
        p.error(f"--target full: method {cfg.method} is not a SoftSRV method (np, mp, mc)")
    if cfg.answer_samples > 1 and (cfg.task != "gsm8k" or cfg.answer_temperature <= 0):
        p.error("--answer-samples > 1 (self-consistency) needs --task gsm8k and --answer-temperature > 0")
    return cfg, args.out, args.stop_after


def command_line(cfg: PipelineConfig, out) -> str:
    """The command that reproduces the run: task, method, preset, folder, and every setting that
    differs from what the preset gives, as the option that sets it (an option added to parser()
    and PipelineConfig is covered without a change here)."""
    target = ["--task", cfg.task] if cfg.task != CUSTOM else \
        ["--data", cfg.data] + [w for o, v in (("--field", cfg.field), ("--answer-field", cfg.answer_field)) if v
                                for w in (o, v)]
    base, _, _ = parse_args([*target, "--method", cfg.method, "--preset", cfg.preset])
    by_dest = {a.dest: a for a in parser()._actions if a.option_strings}
    words = ["python", "pipeline.py", *target, "--method", cfg.method, "--preset", cfg.preset, "--out", str(out)]
    unset = []
    for f in fields(PipelineConfig):
        value = getattr(cfg, f.name)
        # the files' sha256s are recorded from the files, not given
        if f.name in ("task", "data", "field", "answer_field", "method", "preset", "data_sha256", "test_sha256") \
                or value == getattr(base, f.name):
            continue
        opt = by_dest.get(f.name)
        if opt is None or value is None:
            unset.append(f"{f.name}={value!r}")    # set in code, not by an option
        elif isinstance(value, bool):
            words += [opt.option_strings[0]] if value else []
        else:
            words += [opt.option_strings[0], *map(str, value if isinstance(value, (list, tuple)) else [value])]
    cmd = " ".join(shlex.quote(w) for w in words)
    return cmd + (f" (and, with no option for them: {', '.join(unset)})" if unset else "")


def main(argv=None):
    cfg, out, stop_after = parse_args(argv)
    with cli_errors():
        run_pipeline(cfg, out, stop_after)


if __name__ == "__main__":
    keep_freed_memory()   # before the first big allocation (model.py says why)
    main()
