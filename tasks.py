"""The benchmarks (paper Sec. 3.3, step 6): each task's prompts, runner and scoring, the held-out answer
loss, and evaluate_task, which eval.py (the CLI), the pipeline's evaluation and answers.py share. What
every evaluation reports: eval.py's help (docs/evaluation.md)."""
from __future__ import annotations

import ast
import json
import math
import re
import string
import textwrap
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import sandbox
from data import atomic_write
from dist import cpus_per_rank, deal, gather, rank0_first
from runtime import DTYPES, default_device, dtype_of
from sampling import cut_at, generate_from_ids, split_common_prefix, stop_on
from tokenizer import PLAIN_QA, qa_answer_ids, qa_prompt_ids
from weights import load_model, load_tokenizer


# ----------------------------------------------------------------------------------------------
# Log-likelihoods (teacher forcing, right padding: causal attention never sees the pads after a row)

def _batches(n: int, length, batch_size: int) -> list[list[int]]:
    """Indices 0..n-1, longest first, in batches of batch_size: the batches the scorers compute.
    Under torchrun whole batches are dealt out, so each is the batch one process computes (a row's
    logits move in their last bits with the batch's padding and row count)."""
    order = sorted(range(n), key=lambda i: -length(i))
    return [order[s:s + batch_size] for s in range(0, n, batch_size)]


def _in_order(batches: list[list[int]], parts: list, n: int) -> list:
    """Per-batch results (one per row) back in index order."""
    out = [None] * n
    for rows, part in zip(batches, parts):
        for i, x in zip(rows, part):
            out[i] = x
    return out


@torch.no_grad()
def continuation_nll(model, seqs: list[tuple[list[int], list[int]]], batch_size: int = 8,
                     progress: bool = False, desc: str = "answer loss", rank: int = 0, world: int = 1) -> list[float]:
    """Summed negative log-likelihood (nats) of each `cont` given its `ctx`, for (ctx, cont) pairs;
    under torchrun each rank computes its share of the batches and every rank gets all the values."""
    batches = _batches(len(seqs), lambda i: len(seqs[i][0]) + len(seqs[i][1]), batch_size)
    mine = []
    dev = model.device
    for rows in tqdm(deal(batches, rank, world), desc=desc, disable=not progress or rank != 0, leave=False):
        full = [seqs[i][0] + seqs[i][1] for i in rows]
        T = max(map(len, full)) - 1
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        for r, f in enumerate(full):
            ids[r, :len(f) - 1] = torch.tensor(f[:-1])
        h = model.hidden_states(model.embed(ids.to(dev)))
        part = []
        for r, i in enumerate(rows):
            ctx, cont = seqs[i]
            # position p predicts token p + 1: the continuation is predicted from len(ctx) - 1 on
            logits = model.logits(h[r, len(ctx) - 1:len(ctx) - 1 + len(cont)]).float()
            part.append(F.cross_entropy(logits, torch.tensor(cont, device=dev), reduction="sum").item())
        mine.append(part)
    return _in_order(batches, gather(mine, rank, world), len(seqs))


@torch.no_grad()
def choice_logprobs(model, ctxs: list[list[int]], choices: list[list[int]], batch_size: int = 8,
                    progress: bool = False, desc: str = "choices", rank: int = 0, world: int = 1) -> torch.Tensor:
    """[N, C] summed log-probability of each choice after each context (every rank gets all of it;
    each computes its share of the batches). Single-token choices (BoolQ's " yes" / " no") need one
    forward per context: all are read off the last position's logits."""
    if all(len(c) == 1 for c in choices):
        ids = torch.tensor([c[0] for c in choices])
        batches = _batches(len(ctxs), lambda i: len(ctxs[i]), batch_size)
        mine = []
        for rows in tqdm(deal(batches, rank, world), desc=desc, disable=not progress or rank != 0, leave=False):
            T = max(len(ctxs[i]) for i in rows)
            x = torch.zeros(len(rows), T, dtype=torch.long)
            for r, i in enumerate(rows):
                x[r, :len(ctxs[i])] = torch.tensor(ctxs[i])
            h = model.hidden_states(model.embed(x.to(model.device)))
            last = h[torch.arange(len(rows)), torch.tensor([len(ctxs[i]) - 1 for i in rows])]
            mine.append(model.logits(last).float().log_softmax(-1)[:, ids.to(model.device)].cpu())
        rows = _in_order(batches, gather(mine, rank, world), len(ctxs))
        return torch.stack(rows) if rows else torch.empty(0, len(choices))
    nll = continuation_nll(model, [(c, ch) for c in ctxs for ch in choices], batch_size, progress, desc,
                           rank, world)
    return -torch.tensor(nll).view(len(ctxs), len(choices))


def answer_loss(model, tok, pairs: list[tuple[str, str]], batch_size: int = 8, max_tokens: int = 1024,
                progress: bool = True, rank: int = 0, world: int = 1) -> dict:
    """Held-out answer loss: Σ CE of the reference answers / Σ answer tokens, each answer given
    qa_prompt_ids(question). Over max_tokens, the answer is cut first (to what fits after the
    prompt, at least one token), then the prompt from the left. Under torchrun (rank, world) the
    ranks share the work and each returns the whole result."""
    seqs, truncated = [], []
    for q, a in pairs:
        p, ans = qa_prompt_ids(tok, q), qa_answer_ids(tok, a)
        n = len(p) + len(ans)
        ans = ans[:max(1, max_tokens - len(p))]
        if len(p) + len(ans) > max_tokens:      # cut from the left; the BOS (when any) stays first
            p = tok.with_bos(p[len(p) + len(ans) - max_tokens + tok.add_bos:])
        seqs.append((p, ans))
        truncated.append(n > max_tokens)
    nll = continuation_nll(model, seqs, batch_size, progress, rank=rank, world=world)
    tokens = sum(len(a) for _, a in seqs)
    per_item = [{"loss": l / len(a), "tokens": len(a), "truncated": t}
                for l, (_, a), t in zip(nll, seqs, truncated)]
    return {"loss": sum(nll) / max(tokens, 1), "tokens": tokens, "per_item": per_item}


# ----------------------------------------------------------------------------------------------
# Under torchrun (rank, world) each rank decodes and tests its share of the items, and every rank
# gets all the results in item order, so the records are those of one process.

def generate(model, tok, prompts: list[list[int]], max_new_tokens: int, stop, batch_size: int,
             rank: int = 0, world: int = 1, shared_prefix: bool = False) -> list[list[int]]:
    """Greedy generate_from_ids of the prompts, this rank's share of them. shared_prefix: the
    prompts' common start (the k-shot exemplars) is prefilled once; it is found over all the
    prompts, not the share, so that each prompt is computed as in one process."""
    prefix, rest = split_common_prefix(prompts) if shared_prefix else ([], prompts)
    return gather(generate_from_ids(model, deal(rest, rank, world), max_new_tokens, tok.eos_id, stop=stop,
                                    batch_size=batch_size, progress=rank == 0, prefix=prefix), rank, world)


def run_tests(jobs: list[tuple[str, list[str] | str]], rank: int = 0, world: int = 1,
              setup: list[str] | None = None) -> list[tuple[bool, str]]:
    """sandbox.run_tests_many of this rank's share of the jobs, on its share of the CPUs."""
    setup = deal(setup if setup is not None else [""] * len(jobs), rank, world)
    return gather(sandbox.run_tests_many(deal(jobs, rank, world), timeout_s=10.0, workers=cpus_per_rank(),
                                         progress=rank == 0, setup=setup), rank, world)


# ----------------------------------------------------------------------------------------------
# GSM8K: 5-shot, greedy, the final number (Cobbe et al.; the paper's Table 1 "GSM8K" column)

GSM8K_STOPS = ["Question:"]
_NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?")


def gsm8k_clean(solution: str) -> str:
    """A GSM8K solution without its calculator annotations "<<48/2=24>>"."""
    return re.sub(r"<<[^>]*>>", "", solution)


def parse_number(text: str) -> float | None:
    """The last number in `text` (commas and $ removed; "5.00" is 5), or None."""
    found = _NUMBER.findall(text.replace("$", ""))
    for m in reversed(found):
        try:
            return float(m.replace(",", ""))
        except ValueError:   # a lone "-," and the like
            continue
    return None


def gsm8k_extract(completion: str) -> float | None:
    """The model's answer: the number after "####" when the completion has one (the format the shots
    teach), else the final number of the completion; None when there is no number."""
    if "####" in completion:
        after = parse_number(completion.rsplit("####", 1)[1].strip().split("\n")[0])
        if after is not None:
            return after
    return parse_number(completion)


def gsm8k_reference(answer: str) -> float:
    return float(answer.rsplit("####", 1)[1].strip().replace(",", "").replace("$", ""))


def gsm8k_prompt(shots: list[data.Example], question: str) -> str:
    demos = "".join(f"Question: {e.text}\nAnswer: {gsm8k_clean(e.answer)}\n\n" for e in shots)
    return demos + f"Question: {question}\nAnswer:"


def _same_number(a: float | None, b: float) -> bool:
    return a is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)


def run_gsm8k(model, tok, items, shots, batch_size, rank=0, world=1):
    # the shots' tokens (the same in every prompt) are prefilled once and shared by every row
    prompts = [tok.with_bos(tok.encode(gsm8k_prompt(shots, e.text))) for e in items]
    gen = generate(model, tok, prompts, 256, stop_on(tok, GSM8K_STOPS), batch_size, rank, world,
                   shared_prefix=bool(shots))
    records = []
    for e, g in zip(items, gen):
        completion = cut_at(tok.decode(g), GSM8K_STOPS).strip()
        pred, ref = gsm8k_extract(completion), gsm8k_reference(e.answer)
        records.append({"id": e.id, "question": e.text, "reference": ref, "completion": completion,
                        "generated_tokens": len(g), "prediction": pred, "correct": _same_number(pred, ref)})
    return records


# ----------------------------------------------------------------------------------------------
# MBPP: 3-shot, the prompt of Austin et al. (code between [BEGIN] and [DONE]), tests in the sandbox

MBPP_STOPS = ["[DONE]"]


def _mbpp_task(e: data.Example) -> str:
    tests = "\n".join(e.meta["test_list"])
    return (f"You are an expert Python programmer, and here is your task: {e.text} "
            f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")


def mbpp_prompt(shots: list[data.Example], e: data.Example) -> str:
    demos = "".join(_mbpp_task(s) + s.answer.replace("\r\n", "\n").strip() + "\n[DONE]\n" for s in shots)
    return demos + _mbpp_task(e)


def run_mbpp(model, tok, items, shots, batch_size, rank=0, world=1):
    prompts = [tok.with_bos(tok.encode(mbpp_prompt(shots, e))) for e in items]
    gen = generate(model, tok, prompts, 384, stop_on(tok, MBPP_STOPS), batch_size, rank, world,
                   shared_prefix=bool(shots))
    codes = [cut_at(tok.decode(g), MBPP_STOPS).strip() for g in gen]
    jobs = [(c, e.meta["test_list"]) for c, e in zip(codes, items)]
    results = run_tests(jobs, rank, world, setup=[e.meta.get("test_setup_code", "") for e in items])
    return [{"id": e.id, "question": e.text, "completion": c, "correct": bool(ok), "detail": detail[-500:]}
            for e, c, (ok, detail) in zip(items, codes, results)]


# ----------------------------------------------------------------------------------------------
# HumanEval: the function prompt, greedy until the function ends, its `check` in the sandbox

HUMANEVAL_STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint("]


def run_humaneval(model, tok, items, shots, batch_size, rank=0, world=1):
    gen = generate(model, tok, [tok.with_bos(tok.encode(e.text)) for e in items], 384,
                   stop_on(tok, HUMANEVAL_STOPS), batch_size, rank, world)
    completions = [cut_at(tok.decode(g), HUMANEVAL_STOPS) for g in gen]
    jobs = [(e.text + c, e.meta["test"] + f"\ncheck({e.meta['entry_point']})\n")
            for e, c in zip(items, completions)]
    results = run_tests(jobs, rank, world)
    return [{"id": e.id, "task_id": e.meta["task_id"], "completion": c, "correct": bool(ok),
             "detail": detail[-500:]} for e, c, (ok, detail) in zip(items, completions, results)]


# ----------------------------------------------------------------------------------------------
# BoolQ: which of the template's two answer words is more likely (accuracy on dev)

BOOLQ_TEMPLATE = "{passage}\nQuestion: {question}?\nAnswer:"
BOOLQ_CHOICES = {"false": " no", "true": " yes"}


def boolq_context(e: data.Example) -> str:
    return BOOLQ_TEMPLATE.format(passage=e.meta["passage"], question=e.meta["question"])


def run_boolq(model, tok, items, shots, batch_size, rank=0, world=1):
    demos = "".join(boolq_context(s) + BOOLQ_CHOICES[s.answer] + "\n\n" for s in shots)
    ctxs = [tok.with_bos(tok.encode(demos + boolq_context(e))) for e in items]
    labels = list(BOOLQ_CHOICES)
    lp = choice_logprobs(model, ctxs, [tok.encode(BOOLQ_CHOICES[k]) for k in labels], batch_size,
                         progress=True, desc="boolq", rank=rank, world=world)
    return [{"id": e.id, "question": e.meta["question"], "reference": e.answer,
             "prediction": labels[int(row.argmax())], "logprobs": dict(zip(labels, row.tolist())),
             "correct": labels[int(row.argmax())] == e.answer} for e, row in zip(items, lp)]


# ----------------------------------------------------------------------------------------------
# TriviaQA (out of domain, paper Table 2): 0-shot, exact match against any alias

TRIVIAQA_STOPS = ["\n"]


def normalize_answer(s: str) -> str:
    """SQuAD/TriviaQA normalization: lowercase, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def run_triviaqa(model, tok, items, shots, batch_size, rank=0, world=1):
    prompts = [tok.with_bos(tok.encode(PLAIN_QA.format(question=e.text))) for e in items]
    gen = generate(model, tok, prompts, 32, stop_on(tok, TRIVIAQA_STOPS), batch_size, rank, world)
    records = []
    for e, g in zip(items, gen):
        pred = cut_at(tok.decode(g), TRIVIAQA_STOPS).strip()
        aliases = {normalize_answer(a) for a in e.meta["aliases"]}
        records.append({"id": e.id, "question": e.text, "prediction": pred, "reference": e.answer,
                        "correct": normalize_answer(pred) in aliases})
    return records


# ----------------------------------------------------------------------------------------------
# The student's own format (docs/experiments/README.md): 0-shot, the question as the user turn of the chat
# template (qa_prompt_ids, the format fine-tuning trains on), the answer as the assistant writes it.
# The k-shot figures above are the paper's; these say whether fine-tuning taught the student
# something it shows in the format it was taught in. Each returns one dict of "chat_*" fields per item.

GSM8K_CHAT_TOKENS, MBPP_CHAT_TOKENS = 256, 384      # the k-shot runs' budgets


def end_ids(tok) -> set[int]:
    """Tokens that end the assistant's turn: EOS (<|im_end|> for ChatML) and the other end markers
    a model may write instead (<|endoftext|>, Gemma's <end_of_turn>/<eos>) when it has them."""
    names = ("<|endoftext|>", "<|im_end|>", "<end_of_turn>", "<eos>", "</s>")
    return {tok.eos_id} | {tok.special_tokens[n] for n in names if n in getattr(tok, "special_tokens", {})}


def chat_answers(model, tok, items, max_new_tokens: int, batch_size: int, rank: int = 0, world: int = 1) -> list[dict]:
    """Greedy 0-shot answers to qa_prompt_ids(question): the text before the end of the turn.
    "finished" is False when the token budget ran out first (an answer cut short). Without a chat
    template (the plain "Question: ...\\nAnswer:" form) the answer also ends where a new "Question:"
    starts."""
    ends = end_ids(tok)
    stops = [] if tok.chat_template else GSM8K_STOPS
    text_stop = stop_on(tok, stops) if stops else None
    stop = lambda ids: ids[-1] in ends or (text_stop is not None and text_stop(ids))
    gen = generate(model, tok, [qa_prompt_ids(tok, e.text) for e in items], max_new_tokens, stop, batch_size,
                   rank, world)
    out = []
    for g in gen:
        ended = bool(g) and g[-1] in ends
        text = cut_at(tok.decode(g[:-1] if ended else g), stops)
        out.append({"chat_completion": text.strip(), "chat_generated_tokens": len(g),
                    "chat_finished": ended or len(g) < max_new_tokens or (bool(stops) and text != tok.decode(g))})
    return out


def run_gsm8k_chat(model, tok, items, batch_size, rank=0, world=1):
    """GSM8K pass@1 in the chat format: gsm8k_extract of the answer (its "#### N" if it has one, else
    its last number) against the reference."""
    out = chat_answers(model, tok, items, GSM8K_CHAT_TOKENS, batch_size, rank, world)
    for e, r in zip(items, out):
        pred = gsm8k_extract(r["chat_completion"])
        r.update(chat_prediction=pred, chat_correct=_same_number(pred, gsm8k_reference(e.answer)))
    return out


_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.S)
_TOP_DEF = re.compile(r"(?:async\s+)?def\s+([A-Za-z_]\w*)\s*\(")
_IMPORT = re.compile(r"(?:import|from)\s+[A-Za-z_]")


def mbpp_code(answer: str) -> str:
    """The code of a chat answer: the first ``` fenced block that defines a function (else the first
    block, else the whole answer), dedented; of it, the imports and the top-level function
    definitions (decorators and bodies), in order. Prose, example calls and the model's own asserts
    or prints between and after them are dropped: they are not the solution and could fail it.
    Keeping every top-level def, not only the first, keeps helper functions the solution calls."""
    blocks = _FENCE.findall(answer)
    text = next((b for b in blocks if re.search(r"^\s*(?:async\s+)?def ", b, re.M)), blocks[0] if blocks else answer)
    lines = textwrap.dedent(text.replace("\r\n", "\n")).split("\n")
    kept, i = [], 0
    while i < len(lines):
        line = lines[i]
        if _IMPORT.match(line):
            kept.append(line)
        elif line.startswith("@") or _TOP_DEF.match(line):
            j = i + 1
            while j < len(lines) and lines[j - 1].startswith("@"):   # decorators, then their def
                j += 1
            while j < len(lines) and (not lines[j].strip() or lines[j][0] in " \t"):
                j += 1
            kept.extend(lines[i:j])
            i = j
            continue
        i += 1
    return "\n".join(kept).strip() + "\n" if kept else text.strip()


def mbpp_entry_point(tests: list[str]) -> str | None:
    """The function the asserts call: the first called name that is not a builtin, e.g.
    "similar_elements" in `assert set(similar_elements((3, 4), (5, 4))) == set((4,))`."""
    import builtins
    for t in tests:
        try:
            tree = ast.parse(t)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not hasattr(builtins, node.func.id):
                return node.func.id
    return None


def mbpp_bind_entry_point(code: str, entry: str | None) -> str:
    """`code` plus `entry = <its first function>` when it does not define `entry` itself.

    In the chat format the user turn is the task's text alone, as in fine-tuning, so the student
    cannot know the name the tests call (the k-shot prompt shows the asserts; this one does not):
    its first function is bound to that name, and the tests then judge what it computes."""
    names = [m.group(1) for m in (_TOP_DEF.match(l) for l in code.split("\n")) if m]
    if entry is None or not names or entry in names:
        return code
    return code + f"\n{entry} = {names[0]}\n"


def run_mbpp_chat(model, tok, items, batch_size, rank=0, world=1):
    """MBPP pass@1 in the chat format: mbpp_code of the answer, bound to the tests' function name,
    run against the asserts in the sandbox as run_mbpp does."""
    out = chat_answers(model, tok, items, MBPP_CHAT_TOKENS, batch_size, rank, world)
    codes = [mbpp_bind_entry_point(mbpp_code(r["chat_completion"]), mbpp_entry_point(e.meta["test_list"]))
             for e, r in zip(items, out)]
    results = run_tests([(c, e.meta["test_list"]) for c, e in zip(codes, items)], rank, world,
                        setup=[e.meta.get("test_setup_code", "") for e in items])
    for r, c, (ok, detail) in zip(out, codes, results):
        r.update(chat_code=c, chat_correct=bool(ok), chat_detail=detail[-500:])
    return out


# BoolQ in the chat format: the user turn is the example's text ("PASSAGE: ...\nQUESTION: ...", what
# fine-tuning trains on); the answer is the assistant's first token. In the chat template that
# token follows "assistant\n", so the words carry no leading space (qa_answer_ids' rendering; the
# plain form's is " True"). A label's probability pools its capitalised and lower-case spelling:
# the control arm trains on the reference "true"/"false", answer prompts may teach "True"/"False".
BOOLQ_CHAT_WORDS = {"false": ("False", "false"), "true": ("True", "true")}


def boolq_chat_tokens(tok) -> dict[str, list[int]]:
    """label -> the distinct first tokens of its spellings, as qa_answer_ids renders them."""
    out = {k: sorted({qa_answer_ids(tok, w)[0] for w in words}) for k, words in BOOLQ_CHAT_WORDS.items()}
    if set(out["true"]) & set(out["false"]):
        raise ValueError(f"{tok!r}: True and False share a first token; BoolQ's chat scoring needs them apart")
    return out


def run_boolq_chat(model, tok, items, batch_size, rank=0, world=1):
    """BoolQ accuracy from chat-format probabilities: log Σ p(first token) over each label's spellings
    after qa_prompt_ids(text); the larger one is the prediction."""
    words = boolq_chat_tokens(tok)
    labels, flat = list(words), [t for k in words for t in words[k]]
    lp = choice_logprobs(model, [qa_prompt_ids(tok, e.text) for e in items], [[t] for t in flat], batch_size,
                         progress=True, desc="boolq chat", rank=rank, world=world)
    cols, s = [], 0
    for k in labels:
        cols.append(lp[:, s:s + len(words[k])].logsumexp(-1))
        s += len(words[k])
    lab = torch.stack(cols, -1)
    return [{"chat_prediction": labels[int(row.argmax())], "chat_logprobs": dict(zip(labels, row.tolist())),
             "chat_correct": labels[int(row.argmax())] == e.answer} for e, row in zip(items, lab)]


def boolq_priors(items, records) -> dict:
    """What the label prior alone explains (docs/experiments/README.md): the majority label of the evaluated items and
    its accuracy (always answering it), and the share of items each scoring predicts "true"."""
    n = len(items)
    n_true = sum(e.answer == "true" for e in items)
    major = "true" if n_true * 2 >= n else "false"
    out = {"majority_label": major, "majority_accuracy": max(n_true, n - n_true) / n,
           "reference_true_share": n_true / n,
           "true_share": sum(r["prediction"] == "true" for r in records) / n}
    if all("chat_prediction" in r for r in records):
        out["chat_true_share"] = sum(r["chat_prediction"] == "true" for r in records) / n
    return out


CHAT_RUNNERS = {"gsm8k": run_gsm8k_chat, "mbpp": run_mbpp_chat, "boolq": run_boolq_chat}


# ----------------------------------------------------------------------------------------------
# The tasks: held-out split, where the shots come from, metric

TASKS = {  # task: (evaluated split, shots split, default shots, metric name, runner)
    "gsm8k": ("test", "train", 5, "pass@1", run_gsm8k),
    "mbpp": ("test", "train", 3, "pass@1", run_mbpp),
    "boolq": ("dev", "train", 0, "accuracy", run_boolq),
    "triviaqa": ("validation", None, 0, "exact_match", run_triviaqa),
    "humaneval": ("test", None, 0, "pass@1", run_humaneval),
}


def reference_answer(task: str, e: data.Example) -> str:
    """The reference answer the held-out answer loss scores (GSM8K without calculator annotations)."""
    return gsm8k_clean(e.answer) if task == "gsm8k" else e.answer


def default_out(task: str, model: str) -> Path:
    name = Path(model).name if Path(model).expanduser().exists() else model.replace("/", "--")
    return Path("out/eval") / f"{task}-{name}.json"


def evaluate_task(task: str, model: str, limit: int | None = None, shots: int | None = None,
                  batch_size: int = 8, out: str | None = None, dtype: str = "auto",
                  loss_only: bool = False, loss_limit: int | None = None, chat: bool = True,
                  rank: int = 0, world: int = 1) -> dict:
    """Task metric and held-out answer loss of `model` on `task`; writes per-item records and the
    summary as JSON to `out` (default out/eval/<task>-<model>.json) and returns the summary.

    The task metric ("score", the paper's k-shot one) runs on the first `limit` held-out items, and
    with `chat` (gsm8k, mbpp, boolq) so does its 0-shot chat-format twin ("chat_score", CHAT_RUNNERS).
    The answer loss runs on the first `loss_limit` held-out items (default: all of them, whatever
    `limit` is: it is cheap and it is the figure that moves at this scale); its per-item values go to
    the output's "answer_losses" list (id, loss, tokens) for stats.compare_evals' paired bootstrap.
    loss_only skips both metrics (score None): the answer loss alone is cheap, generation is not.
    Under torchrun (rank, world) every rank evaluates its share of the items and returns the whole
    summary; rank 0 writes the file one process writes (its "seconds" aside)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (available: {', '.join(TASKS)})")
    split, shot_split, default_shots, metric, run = TASKS[task]
    shots = default_shots if shots is None else shots
    if shots < 0 or (limit is not None and limit < 1) or (loss_limit is not None and loss_limit < 1) \
            or batch_size < 1:
        raise ValueError("need --shots >= 0, --limit >= 1, --loss-limit >= 1, --batch-size >= 1")
    if shots and shot_split is None:
        raise ValueError(f"--shots {shots}: {task} has no train fold offline to draw shots from; it is 0-shot")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    out_path = Path(out) if out else default_out(task, model)

    def _stage(what: str, t0: float):
        if rank == 0:
            print(f"eval {task}: {what} ({time.time() - t0:.1f}s)", flush=True)

    t0 = time.time()
    with rank0_first(rank, world):      # downloads and conversions are cached once, by rank 0
        heldout = data.load_examples(task, split)
        items, loss_items = heldout[:limit], heldout[:loss_limit]
        demos = data.load_examples(task, shot_split, limit=shots) if shots else []
        _stage(f"{len(items)} held-out items ({task}/{split}), {len(demos)} shots; "
               f"answer loss on {len(loss_items)}", t0)
        device = default_device()
        lm = load_model(model, dtype=dtype_of(dtype, device), device=device)
        tok = load_tokenizer(model)
    _stage(f"loaded {model} ({lm.dtype}, {device})", t0)

    t1 = time.time()
    chat_run = CHAT_RUNNERS.get(task) if chat and not loss_only else None
    extra = {}
    if loss_only:
        records, n_correct, score = [{"id": e.id, "question": e.text} for e in items], None, None
    else:
        records = run(lm, tok, items, demos, batch_size, rank, world)
        n_correct = sum(r["correct"] for r in records)
        score = n_correct / len(records)
        _stage(f"{metric} {score:.4f} ({n_correct}/{len(records)}) in {time.time() - t1:.1f}s", t0)
    if chat_run is not None:
        t1 = time.time()
        for r, c in zip(records, chat_run(lm, tok, items, batch_size, rank, world)):
            r.update(c)
        k = sum(r["chat_correct"] for r in records)
        extra.update(chat_score=k / len(records), chat_correct=k)
        if "chat_finished" in records[0]:
            extra["chat_finished"] = sum(r["chat_finished"] for r in records)
        _stage(f"0-shot chat {metric} {k / len(records):.4f} ({k}/{len(records)}) in "
               f"{time.time() - t1:.1f}s", t0)
    if task == "boolq" and not loss_only:
        extra.update(boolq_priors(items, records))
        _stage(f"majority label {extra['majority_label']!r}: accuracy {extra['majority_accuracy']:.4f}; "
               f"predicted true: {extra['true_share']:.3f} plain" +
               (f", {extra['chat_true_share']:.3f} chat" if "chat_true_share" in extra else ""), t0)

    t1 = time.time()
    al = answer_loss(lm, tok, [(e.text, reference_answer(task, e)) for e in loss_items], batch_size,
                     rank=rank, world=world)
    losses = [{"id": e.id, "loss": a["loss"], "tokens": a["tokens"], "truncated": a["truncated"]}
              for e, a in zip(loss_items, al["per_item"])]
    by_id = {a["id"]: a for a in losses}
    for r in records:
        if r["id"] in by_id:
            r["answer_loss"], r["answer_tokens"] = by_id[r["id"]]["loss"], by_id[r["id"]]["tokens"]
    _stage(f"answer loss {al['loss']:.4f} over {al['tokens']} tokens of {len(loss_items)} items "
           f"in {time.time() - t1:.1f}s", t0)

    summary = {"task": task, "model": str(model), "metric": metric, "score": score, "n": len(records),
               "correct": n_correct, **extra, "answer_loss": al["loss"], "answer_tokens": al["tokens"],
               "answer_n": len(loss_items), "split": split, "shots": shots,
               "dtype": str(lm.dtype).removeprefix("torch."), "seconds": round(time.time() - t0, 1)}
    if rank == 0:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out_path, lambda p: p.write_text(json.dumps(
            {"summary": summary, "items": records, "answer_losses": losses}, indent=1, ensure_ascii=False)))
        _stage(f"wrote {out_path}", t0)
    if world > 1:
        torch.distributed.barrier()     # no rank goes on to read or skip the file before it is there
    return summary
