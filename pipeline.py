"""The paper's pipeline end to end (Sec. 3.3 Steps 1-6, Appendix A.2, A.3, C), one run per (task, method).

    python pipeline.py --task gsm8k --method mc                  # SoftSRV SS_MC, cpu preset
    python pipeline.py --task gsm8k --method pt                  # the prompt-template baseline
    python pipeline.py --task gsm8k --method mc --preset tiny    # everything, a few minutes
    torchrun --nproc_per_node=2 pipeline.py --task gsm8k --method mc   # 2 processes share the decoding

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

Under torchrun (gloo on CPUs, nccl on GPUs) every rank takes part in steps 1-3: the training is
train.py's data-parallel one, and the generations and answers are dealt out in batches, which rank 0
writes in order, so every file is the one a single process writes with the same seed. Steps 4-6
run in rank 0 alone; the other ranks exit once step 3 is done.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
from dist import append_in_rounds, cli_errors, init_distributed, local_threads
from model import DEFAULT_MODEL, DTYPES, dtype_of, keep_freed_memory, load_model, load_tokenizer
from sampling import cut_at, generate_from_ids, stop_on
from tokenizer import qa_prompt_ids

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
}

# ----------------------------------------------------------------------------------------------
# Settings

# paper: 100K generated -> 50K kept (GSM8K, MBPP) / 20K (BoolQ), 700 clusters of 100-dim TF-IDF/SVD
# features, Gemma 2B fine-tuned with batch 16 x 8192 tokens, lr 1e-6 after 100 warm-up steps.
# cpu: what 2 cores finish in about an hour for one (task, method) with the 135M offline models
# (measured per step in results/; the fine-tuning and the 5-shot evaluation dominate):
# - 1,000 questions generated, 500 kept: the answering LM then writes ~500 answers (~10 min) and the
#   fine-tuning sees ~120K tokens (~15 min); clusters scaled like the paper's 700 per 100K -> 50.
# - SoftSRV sampling: temperature 1 (the paper's) with top-p 0.9: see README "Sampling settings".
# - 5-shot GSM8K on 100 of the 330 held-out items per checkpoint; answer loss on the same 100.
PRESETS = {
    "tiny": dict(train_steps=4, prompt_len=4, n_heldout=8, n_generate=24, n_keep=12, n_clusters=4, svd_dims=8,
                 question_tokens=16, answer_tokens=48, ft_preset="tiny", ft_epochs=1.0, eval_limit=4,
                 top_p=0.9, pt_temperature=1.0, pt_top_p=0.9, sr_rounds=1, buckets=2),
    "cpu": dict(train_steps=None, prompt_len=None, n_heldout=100, n_generate=1000, n_keep=500, n_clusters=50,
                svd_dims=100, question_tokens=None, answer_tokens=256, ft_preset="cpu", ft_epochs=1.0,
                eval_limit=100, top_p=0.9, pt_temperature=1.0, pt_top_p=0.9, sr_rounds=1, buckets=32),
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
    ngram: int = 13
    ft_preset: str = "cpu"
    ft_epochs: float = 1.0
    ft_lr: float | None = None
    eval_limit: int | None = 100        # held-out items per checkpoint evaluation (None: all)
    buckets: int = 32                   # MAUVE clusters (the paper's 32)
    batch_size: int = 16
    seed: int = 0
    dtype: str = "auto"

    def keep(self) -> int:
        return self.n_keep if self.n_keep is not None else PAPER_KEEP[self.task]


class Run:
    """The run folder: settings.json (refuses other settings), state.json (finished steps with their
    counts and times), and each step's files; and the processes working on it. Under torchrun every
    rank runs the steps that decode (train, generate, answer), each on its share, and rank 0 alone
    writes the run's files and runs the rest."""

    def __init__(self, cfg: PipelineConfig, out: Path, rank: int = 0, world: int = 1, device: str = "cpu"):
        self.cfg, self.out = cfg, out
        self.rank, self.world, self.device = rank, world, device
        out.mkdir(parents=True, exist_ok=True)
        mine = asdict(cfg)
        path = out / "settings.json"
        if path.exists():
            theirs = json.loads(path.read_text())
            diff = [f"{k}: {theirs.get(k)!r} -> {v!r}" for k, v in mine.items() if theirs.get(k) != v]
            if diff:
                raise ValueError(f"{out}: holds a run with other settings ({'; '.join(diff)}); "
                                 f"choose another --out or delete the folder")
        elif rank == 0:
            _write_json(path, mine)
        self.state = json.loads((out / "state.json").read_text()) if (out / "state.json").exists() else {}

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
_MARK = re.compile(r"(?im)(?:^|(?<=\s))[*#]*(?:passage and question|question|passage)\s*\d+\s*[:.)]\**[ \t]*"
                   r"|^[ \t*]*\d{1,2}[.)][ \t]+")


def parse_numbered(completion: str) -> list[str]:
    """A PT completion -> its questions. The template ends with "Question 1:", so the text before the
    first "Question N:" / "N." marker is question 1; each marker starts the next one."""
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
    cluster, round-robin over the clusters, without replacement, until n are chosen."""
    if n >= len(texts):
        return list(range(len(texts)))
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
    while len(chosen) < n:
        for pool in pools:
            if pool and len(chosen) < n:
                chosen.append(pool.pop())
    return sorted(chosen)


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
# The steps

def train_cfg(cfg: PipelineConfig, out: Path):
    """The train.py config of Step 1: train.py's own preset ('paper' for the paper preset, else
    'cpu'), the task's train questions, with this run's overrides."""
    import train
    argv = ["--param", cfg.method, "--preset", "paper" if cfg.preset == "paper" else "cpu", "--data", cfg.task,
            "--model", cfg.generator, "--out", str(out / "softsrv"), "--seed", str(cfg.seed),
            "--n-heldout", str(cfg.n_heldout), "--dtype", cfg.dtype]
    if cfg.train_steps:
        argv += ["--steps", str(cfg.train_steps), "--eval-every", str(max(1, cfg.train_steps // 2))]
    if cfg.prompt_len:
        argv += ["--prompt-len", str(cfg.prompt_len)]
    if cfg.preset == "tiny":
        argv += ["--batch-size", "4", "--max-tokens", "48"]
    return train.parse_args(argv)[0]


def step_train(run: Run):
    import train
    from softsrv import CKPT_CONFIG
    cfg = run.cfg
    tcfg = train_cfg(cfg, run.out)
    t0 = run.start("train", f"SS_{cfg.method.upper()} on {cfg.task} train questions, {tcfg.steps} steps -> {tcfg.out}")
    resume = (Path(tcfg.out) / CKPT_CONFIG).exists()
    result = train.train(tcfg, resume=resume, show_samples=0)
    hist = result["history"]
    run.finish("train", {"steps": tcfg.steps, "heldout_loss_start": hist[0]["heldout_loss"] if hist else None,
                         "heldout_loss_end": hist[-1]["heldout_loss"] if hist else None}, t0)


def _train_fold(cfg: PipelineConfig) -> list[data.Example]:
    return data.load_examples(cfg.task, "train")


def _complete(model, tok, texts: list[str], cfg: PipelineConfig, seed: int, chat: bool = True,
              max_new: int | None = None, stop=None) -> list[str]:
    """Each text -> the LM's completion at the template temperature (the project's sampler); as a user
    turn of the LM's chat format, or (chat=False) as plain text to be continued."""
    prompts = [qa_prompt_ids(tok, t) if chat else tok.encode(t) for t in texts]
    ids = generate_from_ids(model, prompts, max_new or cfg.question_tokens or 128, tok.eos_id,
                            temperature=cfg.pt_temperature, top_p=cfg.pt_top_p, batch_size=cfg.batch_size, seed=seed,
                            stop=stop)
    return [tok.decode(x).strip() for x in ids]


def _in_chunks(run: Run, path: Path, n: int, chunk: int, make, desc: str):
    """Append records 0..n-1 to a JSONL in chunks, skipping indices already there (resume); under
    torchrun the ranks make the chunks in turn (dist.append_in_rounds). Every rank gets all records."""
    done = {r["index"] for r in data.read_jsonl(path)} if path.exists() else set()
    todo = [i for i in range(n) if i not in done]
    bar = tqdm(total=n, initial=n - len(todo), desc=desc, unit="item", dynamic_ncols=True, disable=run.rank != 0)
    append_in_rounds(path, [todo[s:s + chunk] for s in range(0, len(todo), chunk)], make, run.rank, run.world,
                     on_write=bar.update)
    bar.close()
    return sorted(data.read_jsonl(path), key=lambda r: r["index"])


def generate_pt(run: Run, n_completions: int, train_ex: list[data.Example]) -> list[dict]:
    """PT (Sec. 3.2): Fig. 8's template filled with train questions round-robin; each completion is
    parsed into its numbered questions. The template ends with the cue "Question 1:", a prompt to be
    continued, so it goes in as plain text: SmolLM2-135M-Instruct then continues the numbered list,
    while as a chat turn it mostly answers with one question (README, "Prompt-template baselines")."""
    cfg = run.cfg
    model = load_model(cfg.generator, dtype=dtype_of(cfg.dtype, run.device), device=run.device)
    tok = load_tokenizer(cfg.generator)
    tmpl = TEMPLATES[cfg.task]["question"]
    max_new = 10 * (cfg.question_tokens or 96)       # ten questions; an 11th ends the completion
    stops = ["Question 11", "\n11."]

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
    T = TEMPLATES[cfg.task]
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
        recs = [{"question": e.text, "answer": _reference(cfg.task, e), "source": e.id} for e in train_ex]
        counts["generated"] = len(recs)
    elif cfg.method in SOFTSRV:
        import generate
        t0 = run.start("generate", f"{cfg.n_generate} SoftSRV samples (temperature {cfg.temperature}, top-p {cfg.top_p})")
        path = generate.generate(str(run.out / "softsrv"), cfg.n_generate, out=str(run.out / "generated.jsonl"),
                                 temperature=cfg.temperature, top_p=cfg.top_p, batch_size=cfg.batch_size,
                                 max_new_tokens=cfg.question_tokens, seed=cfg.seed, dtype=cfg.dtype)
        rows = data.read_jsonl(path)
        recs = [{"question": r["text"], "source": r["context_id"]} for r in rows]
        counts["generated"] = len(recs)
        counts["unfinished"] = sum(not r["finished"] for r in rows)
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
        raise ValueError(f"{run.out}: every generated question is empty ({len(recs)} generated); "
                         f"nothing to continue with")
    uniq = dedup([r["question"] for r in recs])
    counts["unique"] = len(uniq)
    recs = [recs[i] for i in uniq]
    if cfg.method != "train" and run.rank == 0:      # the others only wait for the file
        chosen = cluster_subsample([r["question"] for r in recs], cfg.keep(), cfg.n_clusters, cfg.svd_dims, cfg.seed)
        recs = [recs[i] for i in chosen]
    counts["subsampled"] = len(recs)
    if run.rank == 0:
        data.write_jsonl(run.out / "questions.jsonl", [{"index": i, **r} for i, r in enumerate(recs)])
    run.finish("generate", counts, t0)


def _reference(task: str, e: data.Example) -> str:
    from eval import reference_answer
    return reference_answer(task, e)


def step_answer(run: Run):
    cfg = run.cfg
    qs = data.read_jsonl(run.out / "questions.jsonl")
    if cfg.method == "train":
        t0 = run.start("answer", f"{len(qs)} reference answers of the train fold (no generation)")
        recs = [{"index": r["index"], "question": r["question"], "answer": r["answer"], "finished": True} for r in qs]
        if run.rank == 0:
            data.write_jsonl(run.out / "answers.jsonl", recs)
    else:
        how = "the question as-is (chat format)" if cfg.method in SOFTSRV else "Fig. 9's answer template"
        t0 = run.start("answer", f"{len(qs)} questions -> {cfg.answerer}, {how}, "
                              f"temperature {cfg.answer_temperature}, <= {cfg.answer_tokens} tokens")
        model = load_model(cfg.answerer, dtype=dtype_of(cfg.dtype, run.device), device=run.device)
        tok = load_tokenizer(cfg.answerer)
        tmpl = "{q}" if cfg.method in SOFTSRV else TEMPLATES[cfg.task]["answer"]

        def make(idx):
            prompts = [qa_prompt_ids(tok, tmpl.format(q=qs[i]["question"])) for i in idx]
            outs = generate_from_ids(model, prompts, cfg.answer_tokens, tok.eos_id, temperature=cfg.answer_temperature,
                                     batch_size=cfg.batch_size, seed=cfg.seed * 1_000_003 + idx[0])
            return [{"index": i, "question": qs[i]["question"], "answer": tok.decode(o).strip(),
                     "finished": len(o) < cfg.answer_tokens} for i, o in zip(idx, outs)]
        recs = _in_chunks(run, run.out / "answers.jsonl", len(qs), 4 * cfg.batch_size, make, "answers")
    n_empty = sum(not r["answer"] for r in recs)
    run.finish("answer", {"answered": len(recs), "empty": n_empty,
                          "hit_token_limit": sum(not r["finished"] for r in recs)}, t0)


def eval_items(task: str) -> list[data.Example]:
    """The items the run is evaluated on: eval.py's held-out split (offline: the held-out part of the
    test fold); with the real train fold from the hub, the whole test fold."""
    from eval import TASKS as EVAL_TASKS
    split = EVAL_TASKS[task][0]
    if split == "test" and any(e.meta.get("source") == "hf-hub" for e in data.load_examples(task, "train")[:1]):
        split = "test_full"
    return data.load_examples(task, split)


def step_decontam(run: Run):
    cfg = run.cfg
    recs = [r for r in data.read_jsonl(run.out / "answers.jsonl") if r["answer"]]
    test = eval_items(cfg.task)
    t0 = run.start("decontam", f"{len(recs)} pairs against {len(test)} evaluated {cfg.task} items, {cfg.ngram}-grams")
    texts = [e.text for e in test] + [e.answer for e in test if e.answer]
    kept, dropped = decontaminate(recs, texts, cfg.ngram)
    data.write_jsonl(run.out / "dropped.jsonl", dropped)
    data.write_jsonl(run.out / "data.jsonl", [{"question": r["question"], "answer": r["answer"],
                                               "id": f"{cfg.task}-{cfg.method}-{r['index']}",
                                               "method": cfg.method} for r in kept])
    if not kept:
        raise ValueError(f"{run.out}: no (question, answer) pair left after decontamination")
    run.finish("decontam", {"pairs": len(recs), "dropped": len(dropped), "kept": len(kept)}, t0)


def ft_cfg(run: Run):
    import finetune
    cfg = run.cfg
    argv = ["--data", str(run.out / "data.jsonl"), "--out", str(run.out / "finetune"), "--model", cfg.student,
            "--preset", cfg.ft_preset, "--epochs", str(cfg.ft_epochs), "--seed", str(cfg.seed), "--dtype", cfg.dtype]
    if cfg.ft_lr:
        argv += ["--lr", str(cfg.ft_lr)]
    return finetune.parse_args(argv)


def step_finetune(run: Run):
    import finetune
    fcfg = ft_cfg(run)
    t0 = run.start("finetune", f"{run.cfg.student} on {run.out / 'data.jsonl'} -> {fcfg.out}")
    ckpts = finetune.finetune(fcfg)
    run.finish("finetune", {"checkpoints": [s for s, _ in ckpts], "steps": fcfg.steps}, t0)


def step_evaluate(run: Run):
    import eval as ev
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
        else:
            summary = ev.evaluate_task(cfg.task, model, limit=cfg.eval_limit, out=str(path), dtype=cfg.dtype)
        curve.append({"step": step, "score": summary["score"], "answer_loss": summary["answer_loss"],
                      "metric": summary["metric"], "n": summary["n"]})
    mauve = step_mauve(run)
    run.finish("evaluate", {"curve": curve, "mauve": mauve}, t0)


def step_mauve(run: Run) -> dict:
    """MAUVE of the final synthetic questions against the evaluated test questions (Table 4) and
    against the train fold (Table 5); features from E (the generator's model)."""
    import mauve
    cfg = run.cfg
    path = run.out / "mauve.json"
    if path.exists():
        return json.loads(path.read_text())
    gen = [r["question"] for r in data.read_jsonl(run.out / "data.jsonl")]
    out = {}
    for name, ref in (("test", [e.text for e in eval_items(cfg.task)]),
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
    import finetune
    return finetune.completed_checkpoints(run.out / "finetune")


# ----------------------------------------------------------------------------------------------
# Report

def write_report(run: Run):
    cfg, st = run.cfg, run.state
    pairs = data.read_jsonl(run.out / "data.jsonl")
    ev = st.get("evaluate", {})
    curve = ev.get("curve", [])
    plot = _plot_curve(run.out / "curve.png", curve, cfg) if curve else None
    report = {"settings": asdict(cfg), "steps": st, "examples": pairs[:3]}
    _write_json(run.out / "report.json", report)
    g, a, d = st.get("generate", {}), st.get("answer", {}), st.get("decontam", {})
    lines = [f"# {cfg.task} / {cfg.method} ({cfg.preset} preset)", "",
             f"Command: `python pipeline.py --task {cfg.task} --method {cfg.method} --preset {cfg.preset} "
             f"--out {run.out}`", "", "## Counts", "",
             "| generated | unique | subsampled | answered | empty answers | dropped (decontamination) | kept |",
             "|---|---|---|---|---|---|---|",
             f"| {g.get('generated')} | {g.get('unique')} | {g.get('subsampled')} | {a.get('answered')} | "
             f"{a.get('empty')} | {d.get('dropped')} | {d.get('kept')} |", ""]
    if "completions" in g:
        lines += [f"PT parse: {g['completions']} completions; questions per completion "
                  f"{g['questions_per_completion']}; {g['completions_without_questions']} with none.", ""]
    if "self_refine" in g:
        lines += ["PT_SR rounds: " + "; ".join(f"round {r['round']}: {r['questions']} questions, {r['stopped']} "
                                                f"'Stop', {r['refined']} refined, {r['empty_kept']} empty (kept)"
                                                for r in g["self_refine"]["rounds"]), ""]
    if a.get("hit_token_limit"):
        lines += [f"{a['hit_token_limit']} answers hit the {cfg.answer_tokens}-token limit.", ""]
    if "mauve" in ev:
        m = ev["mauve"]
        lines += ["## MAUVE of the synthetic questions", "",
                  f"- against the evaluated test questions: **{m['test']['mauve']:.3f}** "
                  f"({m['test']['n_gen']} vs {m['test']['n_ref']}, {cfg.buckets} buckets)",
                  f"- against the train fold: **{m['train']['mauve']:.3f}** ({m['train']['n_ref']} questions)", ""]
    if curve:
        lines += ["## Fine-tuning curve", "", f"Student {cfg.student}; step 0 is the student before fine-tuning; "
                  f"{curve[0]['n']} held-out items.", "",
                  f"| step | {curve[0]['metric']} | held-out answer loss |", "|---|---|---|"]
        lines += [f"| {c['step']} | {c['score']:.4f} | {c['answer_loss']:.4f} |" for c in curve]
        lines += ["", f"![curve]({plot.name})" if plot else "(plot skipped: `pip install matplotlib`)", ""]
    lines += ["## Wall time per step", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v.get('seconds')} |" for k, v in st.items()]
    lines += ["", "## Examples", ""]
    for p in pairs[:3]:
        lines += [f"**Q:** {p['question']}", "", f"**A:** {p['answer']}", ""]
    (run.out / "report.md").write_text("\n".join(lines))
    print(f"[report] {run.out / 'report.md'}")


def _plot_curve(path: Path, curve: list[dict], cfg: PipelineConfig) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    steps = [c["step"] for c in curve]
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
SHARED_STEPS = ("train", "generate", "answer")


def run_pipeline(cfg: PipelineConfig, out: str | None = None, stop_after: str | None = None) -> Path:
    """Steps 1-6 into the run folder (the report once all are done); stop_after ends the run early."""
    rank, world, device = init_distributed()
    # Every rank checks the folder's settings, so a mismatch ends them all with the same one line.
    run = Run(cfg, Path(out or f"runs/{cfg.task}-{cfg.method}"), rank, world, device)
    t0 = time.time()
    for name, fn in STEPS.items():
        if name == "train" and cfg.method not in SOFTSRV:
            continue
        if name not in SHARED_STEPS and run.world > 1:
            # Fine-tuning and evaluation run in one process: ranks 1.. are done, rank 0 goes on alone.
            run.log(f"[{name}] and the steps after it run in rank 0 alone; the other {world - 1} ranks exit")
            if rank != 0:
                return run.out
            run.world = 1
            torch.set_num_threads(local_threads())    # the other ranks' cores are free now
        if run.done(name):
            run.log(f"[{name}] already done ({run.state[name]['seconds']:.0f}s)")
        else:
            fn(run)
        if name == stop_after:
            run.log(f"pipeline: stopped after {name} (--stop-after); the same command without it goes on")
            return run.out
    if rank == 0:
        write_report(run)
        print(f"pipeline: {run.out} complete in {time.time() - t0:.0f}s")
    return run.out


def parse_args(argv=None) -> tuple[PipelineConfig, str | None, str | None]:
    """(settings, --out, --stop-after)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--task", choices=TASKS, default="gsm8k", help="benchmark whose train questions are the target (default gsm8k)")
    a("--method", choices=METHODS, default="mc",
      help="np/mp/mc: SoftSRV (Eq. 1-3); pt, pt_sr: prompt-template baselines; train: the train fold (default mc)")
    a("--preset", choices=PRESETS, default="cpu",
      help="counts and settings: tiny (minutes), cpu (about an hour on 2 cores, default), paper (A.2, Sec. 3.3)")
    a("--out", help="run folder (default runs/<task>-<method>); re-running continues it")
    a("--generator", default=DEFAULT_MODEL, help=f"H and E for SoftSRV, the template LM for PT (default {DEFAULT_MODEL})")
    a("--answerer", default=DEFAULT_MODEL, help=f"the LM that writes answers (default {DEFAULT_MODEL})")
    a("--student", default=DEFAULT_MODEL, help=f"the model fine-tuned and evaluated (default {DEFAULT_MODEL})")
    a("--train-steps", type=int, help="SoftSRV training steps (default: train.py's preset: cpu 250, paper 20000)")
    a("--n-generate", type=int, help="questions generated (tiny 24, cpu 1000, paper 100000)")
    a("--n-keep", type=int, help="N_s, questions kept by the cluster subsample (tiny 12, cpu 500, paper 50K/20K)")
    a("--n-clusters", type=int, help="MiniBatchKMeans clusters for the subsample (tiny 4, cpu 50, paper 700)")
    a("--temperature", type=float, default=1.0, help="SoftSRV sampling temperature (default 1, A.2)")
    a("--top-p", type=float, help="SoftSRV nucleus sampling (cpu 0.9, chosen by a sweep; paper 1.0 = off)")
    a("--pt-temperature", type=float,
      help="PT/PT_SR sampling temperature (tiny/cpu 1.0: at 2 the 135M model writes random tokens; paper 2.0, A.2)")
    a("--pt-top-p", type=float, help="PT/PT_SR nucleus sampling (tiny/cpu 0.9 as SoftSRV's; paper 1.0 = off)")
    a("--sr-rounds", type=int, help="PT_SR: critique and refine rounds at most (tiny/cpu 1, paper 3)")
    a("--answer-temperature", type=float, default=0.0, help="answering temperature (default 0 = greedy)")
    a("--answer-tokens", type=int, help="longest answer in tokens (tiny 48, cpu 256, paper 512)")
    a("--ft-lr", type=float, help="fine-tuning peak lr (default: finetune.py's preset: cpu 2e-5, paper 1e-6)")
    a("--ft-epochs", type=float, help="fine-tuning passes over data.jsonl (default 1)")
    a("--eval-limit", type=int, help="held-out items per evaluation (tiny 4, cpu 100, paper all)")
    a("--buckets", type=int, help="MAUVE k-means buckets (default 32, the paper's)")
    a("--batch-size", type=int, default=16, help="rows decoded together when generating (default 16)")
    a("--seed", type=int, default=0, help="seed of every step (default 0)")
    a("--dtype", choices=DTYPES, default="auto",
      help="model precision (default auto: bf16 where measured faster than fp32 here)")
    a("--stop-after", choices=list(STEPS)[:-1],
      help="end the run after this step, e.g. decontam for just the synthetic data.jsonl (default: run all); "
           "not a setting of the run: the same command without it continues")
    args = p.parse_args(argv)
    preset = dict(PRESETS[args.preset])
    if args.preset == "paper":
        preset["n_keep"] = PAPER_KEEP[args.task]
    given = {f.name: getattr(args, f.name) for f in fields(PipelineConfig)
             if getattr(args, f.name, None) is not None}
    cfg = PipelineConfig(**{**{k: v for k, v in preset.items()}, **given})
    for f in ("n_generate", "n_keep", "n_clusters", "batch_size", "buckets", "answer_tokens"):
        if getattr(cfg, f) is not None and getattr(cfg, f) < 1:
            p.error(f"--{f.replace('_', '-')} must be at least 1")
    if cfg.method not in SOFTSRV and (args.train_steps or args.stop_after == "train"):
        p.error(f"--train-steps / --stop-after train: method {cfg.method} trains no soft prompt")
    return cfg, args.out, args.stop_after


def main(argv=None):
    cfg, out, stop_after = parse_args(argv)
    with cli_errors():
        run_pipeline(cfg, out, stop_after)


if __name__ == "__main__":
    keep_freed_memory()   # before the first big allocation (model.py says why)
    main()
