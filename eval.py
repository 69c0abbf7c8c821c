"""How good is a model on the target tasks (SPEC §5 step 6, §7): task metrics and the held-out answer loss.

    python eval.py task gsm8k --model smollm2-135m-instruct            # 5-shot pass@1 on the 330 held out
    python eval.py task boolq --model out/ft_mc --limit 1000           # a fine-tuned HF folder
    python eval.py mauve --gen out/ss_mc/samples.jsonl --ref gsm8k:test  # see mauve.py

Every `task` run reports two figures on the same held-out items:
- the task metric: GSM8K pass@1 (5-shot, final number), MBPP pass@1 (3-shot, sandboxed tests), BoolQ
  accuracy (log-likelihood of " yes" vs " no"), TriviaQA exact match (0-shot, any alias), HumanEval pass@1;
- the held-out answer loss: mean per-token cross-entropy of the reference answer given the question in
  the one question->answer format (`qa_prompt_ids` / `qa_answer_ids`) that fine-tuning trains on. At
  135M parameters pass@1 barely moves between data sets; this continuous figure does.
Few-shot examples come from the train fold (offline: data.py's stand-in part), never from evaluated items.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import string
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
from model import DEFAULT_MODEL, DTYPES, dtype_of, keep_freed_memory, load_model, load_tokenizer
from data import atomic_write
from sampling import cut_at, generate_from_ids, split_common_prefix, stop_on
from tokenizer import PLAIN_QA, qa_answer_ids, qa_prompt_ids


# ----------------------------------------------------------------------------------------------
# Log-likelihoods (teacher forcing, right padding: causal attention never sees the pads after a row)

@torch.no_grad()
def continuation_nll(model, seqs: list[tuple[list[int], list[int]]], batch_size: int = 8,
                     progress: bool = False, desc: str = "answer loss") -> list[float]:
    """Summed negative log-likelihood (nats) of each `cont` given its `ctx`, for (ctx, cont) pairs."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]) - len(seqs[i][1]))
    out = [0.0] * len(seqs)
    dev = model.device
    for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        rows = order[s:s + batch_size]
        full = [seqs[i][0] + seqs[i][1] for i in rows]
        T = max(map(len, full)) - 1
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        for r, f in enumerate(full):
            ids[r, :len(f) - 1] = torch.tensor(f[:-1])
        h = model.hidden_states(model.embed(ids.to(dev)))
        for r, i in enumerate(rows):
            ctx, cont = seqs[i]
            # position p predicts token p + 1: the continuation is predicted from len(ctx) - 1 on
            logits = model.logits(h[r, len(ctx) - 1:len(ctx) - 1 + len(cont)]).float()
            out[i] = F.cross_entropy(logits, torch.tensor(cont, device=dev), reduction="sum").item()
    return out


@torch.no_grad()
def choice_logprobs(model, ctxs: list[list[int]], choices: list[list[int]], batch_size: int = 8,
                    progress: bool = False, desc: str = "choices") -> torch.Tensor:
    """[N, C] summed log-probability of each choice after each context. Single-token choices (BoolQ's
    " yes" / " no") need one forward per context: all are read off the last position's logits."""
    if all(len(c) == 1 for c in choices):
        ids = torch.tensor([c[0] for c in choices])
        order = sorted(range(len(ctxs)), key=lambda i: -len(ctxs[i]))
        out = torch.empty(len(ctxs), len(choices))
        for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
            rows = order[s:s + batch_size]
            T = max(len(ctxs[i]) for i in rows)
            x = torch.zeros(len(rows), T, dtype=torch.long)
            for r, i in enumerate(rows):
                x[r, :len(ctxs[i])] = torch.tensor(ctxs[i])
            h = model.hidden_states(model.embed(x.to(model.device)))
            last = h[torch.arange(len(rows)), torch.tensor([len(ctxs[i]) - 1 for i in rows])]
            out[rows] = model.logits(last).float().log_softmax(-1)[:, ids.to(model.device)].cpu()
        return out
    nll = continuation_nll(model, [(c, ch) for c in ctxs for ch in choices], batch_size, progress, desc)
    return -torch.tensor(nll).view(len(ctxs), len(choices))


def answer_loss(model, tok, pairs: list[tuple[str, str]], batch_size: int = 8, max_tokens: int = 1024,
                progress: bool = True) -> dict:
    """Held-out answer loss: Σ CE of the reference answers / Σ answer tokens, each answer given
    qa_prompt_ids(question). Over max_tokens, the answer is cut first (to what fits after the
    prompt, at least one token), then the prompt from the left."""
    seqs, truncated = [], []
    for q, a in pairs:
        p, ans = qa_prompt_ids(tok, q), qa_answer_ids(tok, a)
        n = len(p) + len(ans)
        ans = ans[:max(1, max_tokens - len(p))]
        p = p[len(p) + len(ans) - max_tokens:] if len(p) + len(ans) > max_tokens else p
        seqs.append((p, ans))
        truncated.append(n > max_tokens)
    nll = continuation_nll(model, seqs, batch_size, progress)
    tokens = sum(len(a) for _, a in seqs)
    per_item = [{"loss": l / len(a), "tokens": len(a), "truncated": t}
                for l, (_, a), t in zip(nll, seqs, truncated)]
    return {"loss": sum(nll) / max(tokens, 1), "tokens": tokens, "per_item": per_item}


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


def run_gsm8k(model, tok, items, shots, batch_size):
    # the shots' tokens (the same in every prompt) are prefilled once and shared by every row
    prompts = [tok.encode(gsm8k_prompt(shots, e.text)) for e in items]
    prefix, rest = split_common_prefix(prompts) if shots else ([], prompts)
    gen = generate_from_ids(model, rest, 256, tok.eos_id, stop=stop_on(tok, GSM8K_STOPS),
                            batch_size=batch_size, progress=True, prefix=prefix)
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


def _sandbox():
    try:
        import sandbox
    except ImportError:
        raise ValueError("this task runs model-written code, which needs sandbox.py "
                         "(not in this checkout yet)") from None
    return sandbox


def run_mbpp(model, tok, items, shots, batch_size):
    sandbox = _sandbox()
    prompts = [tok.encode(mbpp_prompt(shots, e)) for e in items]
    prefix, rest = split_common_prefix(prompts) if shots else ([], prompts)
    gen = generate_from_ids(model, rest, 384, tok.eos_id, stop=stop_on(tok, MBPP_STOPS),
                            batch_size=batch_size, progress=True, prefix=prefix)
    codes = [cut_at(tok.decode(g), MBPP_STOPS).strip() for g in gen]
    jobs = [(c, e.meta["test_list"]) for c, e in zip(codes, items)]
    results = sandbox.run_tests_many(jobs, timeout_s=10.0, progress=True,
                                     setup=[e.meta.get("test_setup_code", "") for e in items])
    return [{"id": e.id, "question": e.text, "completion": c, "correct": bool(ok), "detail": detail[-500:]}
            for e, c, (ok, detail) in zip(items, codes, results)]


# ----------------------------------------------------------------------------------------------
# HumanEval: the function prompt, greedy until the function ends, its `check` in the sandbox

HUMANEVAL_STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint("]


def run_humaneval(model, tok, items, shots, batch_size):
    sandbox = _sandbox()
    gen = generate_from_ids(model, [tok.encode(e.text) for e in items], 384, tok.eos_id,
                            stop=stop_on(tok, HUMANEVAL_STOPS), batch_size=batch_size, progress=True)
    completions = [cut_at(tok.decode(g), HUMANEVAL_STOPS) for g in gen]
    jobs = [(e.text + c, e.meta["test"] + f"\ncheck({e.meta['entry_point']})\n")
            for e, c in zip(items, completions)]
    results = sandbox.run_tests_many(jobs, timeout_s=10.0, progress=True)
    return [{"id": e.id, "task_id": e.meta["task_id"], "completion": c, "correct": bool(ok),
             "detail": detail[-500:]} for e, c, (ok, detail) in zip(items, completions, results)]


# ----------------------------------------------------------------------------------------------
# BoolQ: which of the template's two answer words is more likely (accuracy on dev)

BOOLQ_TEMPLATE = "{passage}\nQuestion: {question}?\nAnswer:"
BOOLQ_CHOICES = {"false": " no", "true": " yes"}


def boolq_context(e: data.Example) -> str:
    return BOOLQ_TEMPLATE.format(passage=e.meta["passage"], question=e.meta["question"])


def run_boolq(model, tok, items, shots, batch_size):
    demos = "".join(boolq_context(s) + BOOLQ_CHOICES[s.answer] + "\n\n" for s in shots)
    ctxs = [tok.encode(demos + boolq_context(e)) for e in items]
    labels = list(BOOLQ_CHOICES)
    lp = choice_logprobs(model, ctxs, [tok.encode(BOOLQ_CHOICES[k]) for k in labels], batch_size,
                         progress=True, desc="boolq")
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


def run_triviaqa(model, tok, items, shots, batch_size):
    prompts = [tok.encode(PLAIN_QA.format(question=e.text)) for e in items]
    gen = generate_from_ids(model, prompts, 32, tok.eos_id, stop=stop_on(tok, TRIVIAQA_STOPS),
                            batch_size=batch_size, progress=True)
    records = []
    for e, g in zip(items, gen):
        pred = cut_at(tok.decode(g), TRIVIAQA_STOPS).strip()
        aliases = {normalize_answer(a) for a in e.meta["aliases"]}
        records.append({"id": e.id, "question": e.text, "prediction": pred, "reference": e.answer,
                        "correct": normalize_answer(pred) in aliases})
    return records


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


def _stage(task: str, what: str, t0: float):
    print(f"eval {task}: {what} ({time.time() - t0:.1f}s)", flush=True)


def evaluate_task(task: str, model: str, limit: int | None = None, shots: int | None = None,
                  batch_size: int = 8, out: str | None = None, dtype: str = "auto",
                  loss_only: bool = False) -> dict:
    """Task metric and held-out answer loss of `model` on `task`; writes per-item records and the
    summary as JSON to `out` (default out/eval/<task>-<model>.json) and returns the summary.
    loss_only skips the task metric (score None): the answer loss alone is cheap, generation is not."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (available: {', '.join(TASKS)})")
    split, shot_split, default_shots, metric, run = TASKS[task]
    shots = default_shots if shots is None else shots
    if shots < 0 or (limit is not None and limit < 1) or batch_size < 1:
        raise ValueError("need --shots >= 0, --limit >= 1, --batch-size >= 1")
    if shots and shot_split is None:
        raise ValueError(f"--shots {shots}: {task} has no train fold offline to draw shots from; it is 0-shot")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    out_path = Path(out) if out else default_out(task, model)

    t0 = time.time()
    items = data.load_examples(task, split, limit=limit)
    demos = data.load_examples(task, shot_split, limit=shots) if shots else []
    _stage(task, f"{len(items)} held-out items ({task}/{split}), {len(demos)} shots", t0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lm = load_model(model, dtype=dtype_of(dtype, device), device=device)
    tok = load_tokenizer(model)
    _stage(task, f"loaded {model} ({lm.dtype}, {device})", t0)

    t1 = time.time()
    if loss_only:
        records, n_correct, score = [{"id": e.id, "question": e.text} for e in items], None, None
    else:
        records = run(lm, tok, items, demos, batch_size)
        n_correct = sum(r["correct"] for r in records)
        score = n_correct / len(records)
        _stage(task, f"{metric} {score:.4f} ({n_correct}/{len(records)}) in {time.time() - t1:.1f}s", t0)

    t1 = time.time()
    al = answer_loss(lm, tok, [(e.text, reference_answer(task, e)) for e in items], batch_size)
    for r, a in zip(records, al["per_item"]):
        r["answer_loss"], r["answer_tokens"] = a["loss"], a["tokens"]
    _stage(task, f"answer loss {al['loss']:.4f} over {al['tokens']} tokens in {time.time() - t1:.1f}s", t0)

    summary = {"task": task, "model": str(model), "metric": metric, "score": score, "n": len(records),
               "correct": n_correct, "answer_loss": al["loss"], "answer_tokens": al["tokens"],
               "split": split, "shots": shots, "dtype": str(lm.dtype).removeprefix("torch."),
               "seconds": round(time.time() - t0, 1)}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_path, lambda p: p.write_text(json.dumps({"summary": summary, "items": records},
                                                              indent=1, ensure_ascii=False)))
    _stage(task, f"wrote {out_path}", t0)
    return summary


# ----------------------------------------------------------------------------------------------
# CLI

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["mauve"]:  # MAUVE has its own options (mauve.py); pass them through untouched
        try:
            import mauve
        except ImportError:
            sys.exit("error: eval.py mauve needs mauve.py, which is not in this checkout")
        return mauve.cli(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("mauve", help="MAUVE of generated vs reference texts (options: eval.py mauve --help)")
    t = sub.add_parser("task", help="task metric + held-out answer loss of a model",
                       description="Task metric and held-out answer loss of a model; writes JSON.")
    t.add_argument("task", choices=list(TASKS), help="the benchmark")
    t.add_argument("--model", default=DEFAULT_MODEL, help="any name load_model takes: the offline default, "
                   f"a HF folder (e.g. a fine-tuned one), a .gguf, a hub id (default {DEFAULT_MODEL})")
    t.add_argument("--limit", type=int, help="evaluate only the first N held-out items (default: all)")
    t.add_argument("--shots", type=int, help="few-shot examples from the train fold (default: gsm8k 5, "
                   "mbpp 3, boolq 0; triviaqa and humaneval are 0-shot only)")
    t.add_argument("--batch-size", type=int, default=8, help="prompts per forward/decode batch (default 8)")
    t.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="model precision (default auto: bf16 where measured faster than fp32 here)")
    t.add_argument("--out", help="output JSON (default out/eval/<task>-<model>.json)")
    t.add_argument("--loss-only", action="store_true", help="only the held-out answer loss, no task metric "
                   "(score null; default: both)")
    args = p.parse_args(argv)
    try:
        summary = evaluate_task(args.task, args.model, args.limit, args.shots, args.batch_size, args.out,
                                args.dtype, args.loss_only)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    keep_freed_memory()   # before the first big allocation (model.py says why)
    main()
