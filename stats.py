"""Is one student better than another on the same held-out items? (SPEC §10-11; issue 26 §2)

At CPU scale a 135M student solves a few percent of GSM8K, so two arms' pass@1 differ by a handful of
items and their held-out answer losses by a few hundredths of a nat. An ordering is claimed only
with an interval over the items both arms were evaluated on:

- `paired_bootstrap(a, b)`: per-item values of arm A and arm B on the SAME items (0/1 correctness,
  or per-item answer losses weighted by their token counts); resample item indices with replacement
  B times (seeded) and take the 95% percentile interval of the mean difference a - b. Pairing
  removes the item-difficulty variance that two independent intervals (e.g. Wilson) would carry.
- `pooled_paired_bootstrap(a_seeds, b_seeds)`: the same with several fine-tuning seeds per arm.
- `wilson(k, n)`: the Wilson score interval of one proportion (a single pass@1 figure).
- `verdict(lo, hi)`: "A better" / "B better" / "tie": a difference the items cannot detect is a tie.
- `compare_evals(path_a, path_b)`: the above for `eval.py task` output files (a file or one per seed).

    python stats.py -a out/eval/gsm8k-a.json -b out/eval/gsm8k-b.json         # one line per figure
    python stats.py -a mc-s1.json mc-s2.json -b pt-s1.json pt-s2.json         # seeds pooled
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

B_DEFAULT = 10_000


def paired_bootstrap(a, b, B: int = B_DEFAULT, seed: int = 0, level: float = 0.95, weights=None) -> dict:
    """Mean difference a - b over paired items and its percentile interval.

    a, b: per-item values of the two arms, in the same item order. weights (optional, one per item,
    e.g. answer tokens): each mean is Σ w·x / Σ w, so per-item mean losses weighted by their token
    counts give exactly eval.py's token-weighted answer loss. Each of the B resamples draws n item
    indices with replacement (numpy's PCG64 seeded with `seed`) and applies them to BOTH arms.
    Returns {"a", "b", "diff", "lo", "hi", "n", "B", "level"}; two identical arms give diff 0 and
    the interval [0, 0].
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired_bootstrap: need two equal-length non-empty 1-d arrays, got {a.shape} and {b.shape}")
    if not 0 < level < 1 or B < 1:
        raise ValueError(f"paired_bootstrap: need 0 < level < 1 and B >= 1, got {level}, {B}")
    w = np.ones_like(a) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != a.shape or (w < 0).any() or w.sum() <= 0:
        raise ValueError("paired_bootstrap: weights must be one non-negative number per item, not all 0")
    n = len(a)
    d = a - b
    idx = np.random.default_rng(seed).integers(0, n, size=(B, n))
    wr = w[idx]
    # a resample whose items all have weight 0 has no mean: it counts as no difference
    diffs = np.divide((wr * d[idx]).sum(1), wr.sum(1), out=np.zeros(B), where=wr.sum(1) > 0)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(diffs, [tail, 100 - tail])
    mean = lambda x: float((w * x).sum() / w.sum())
    return {"a": mean(a), "b": mean(b), "diff": mean(d), "lo": float(lo), "hi": float(hi),
            "n": n, "B": B, "level": level}


def pooled_paired_bootstrap(a_seeds, b_seeds, B: int = B_DEFAULT, seed: int = 0, level: float = 0.95,
                            weights=None) -> dict:
    """Paired bootstrap over items for arms fine-tuned with several seeds: a_seeds[s][i] is item i's
    value under arm A's seed s (likewise B; the seed counts may differ, the items may not).

    Pooling: each item's values are averaged over the seeds of its arm first (an item's pass rate,
    or its mean loss, over the seeds), then `paired_bootstrap` resamples items. So the interval is
    the item-sampling interval of the seed-averaged difference: averaging shrinks the fine-tuning
    seed noise in each item's value, and the resampling treats the items, the factor both arms
    share, as the random sample. A two-level resampling (seeds, then items) was not chosen: with the
    two or three seeds a CPU run affords, resampling seeds has only a handful of distinct outcomes,
    so its percentiles would be step functions of two numbers. Seed disagreement is reported
    instead of hidden: "per_seed" holds the plain item-mean difference for each seed pair s (A's
    seed s against B's seed s, as far as both have one), and "seeds_agree" says whether they all
    have the sign of the pooled difference.
    """
    a_seeds, b_seeds = np.asarray(a_seeds, dtype=float), np.asarray(b_seeds, dtype=float)
    if a_seeds.ndim != 2 or b_seeds.ndim != 2 or a_seeds.shape[1] != b_seeds.shape[1]:
        raise ValueError(f"pooled_paired_bootstrap: need [seeds, items] arrays over the same items, "
                         f"got {a_seeds.shape} and {b_seeds.shape}")
    out = paired_bootstrap(a_seeds.mean(0), b_seeds.mean(0), B, seed, level, weights)
    w = np.ones(a_seeds.shape[1]) if weights is None else np.asarray(weights, dtype=float)
    per_seed = [float((w * (x - y)).sum() / w.sum()) for x, y in zip(a_seeds, b_seeds)]
    sign = np.sign(out["diff"])
    out.update(seeds_a=len(a_seeds), seeds_b=len(b_seeds), per_seed=per_seed,
               seeds_agree=bool(sign != 0 and all(np.sign(p) == sign for p in per_seed)))
    return out


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of the proportion k/n (default 95%): unlike the normal approximation it
    stays inside [0, 1] and is not empty at k = 0, the common pass@1 at this scale."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"wilson: need 0 <= k <= n and n > 0, got k={k}, n={n}")
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def verdict(lo: float, hi: float, higher_is_better: bool = True) -> str:
    """The reading of an interval for a - b: "tie" when it contains 0 (the items cannot tell the
    arms apart), else the better arm. For losses pass higher_is_better=False."""
    if lo > hi:
        raise ValueError(f"verdict: lo {lo} > hi {hi}")
    if lo <= 0 <= hi:
        return "tie"
    return "A better" if (lo > 0) == higher_is_better else "B better"


# ----------------------------------------------------------------------------------------------
# Two eval.py outputs

# per-item 0/1 fields of eval.py's records that a comparison reads when both files have them
SCORE_FIELDS = {"score": "correct", "chat_score": "chat_correct"}


def _read_eval(path) -> dict:
    d = json.loads(Path(path).read_text())
    if "summary" not in d or "items" not in d:
        raise ValueError(f"{path}: not an eval.py task output (no summary/items)")
    return d


def compare_evals(path_a, path_b, B: int = B_DEFAULT, seed: int = 0) -> dict:
    """Paired comparisons of two arms from their `eval.py task` output files: one file per arm, or a
    list of files per arm (one per fine-tuning seed, pooled as in pooled_paired_bootstrap), all on
    the same task. Compared on the items every file has: the task metric and the chat-format metric
    (0/1 per item, higher is better) and the held-out answer loss (per-item losses weighted by
    their answer tokens, lower is better). Each entry is pooled_paired_bootstrap's dict plus its
    "verdict"; a figure missing from any file is left out."""
    paths_a = [path_a] if isinstance(path_a, (str, Path)) else list(path_a)
    paths_b = [path_b] if isinstance(path_b, (str, Path)) else list(path_b)
    if not paths_a or not paths_b:
        raise ValueError("compare_evals: need at least one file per arm")
    ea, eb = [_read_eval(p) for p in paths_a], [_read_eval(p) for p in paths_b]
    tasks = {e["summary"].get("task") for e in ea + eb}
    if len(tasks) != 1:
        raise ValueError(f"compare_evals: the files are of different tasks ({', '.join(map(str, sorted(tasks, key=str)))})")

    def common(tables):            # per file: id -> row; the ids all files have, in the first's order
        return [i for i in tables[0] if all(i in t for t in tables[1:])]

    out = {}
    for name, field in SCORE_FIELDS.items():
        tables = [{r["id"]: float(r[field]) for r in e["items"] if r.get(field) is not None} for e in ea + eb]
        ids = common(tables)
        if ids:
            va = [[t[i] for i in ids] for t in tables[:len(ea)]]
            vb = [[t[i] for i in ids] for t in tables[len(ea):]]
            res = pooled_paired_bootstrap(va, vb, B, seed)
            out[name] = {**res, "verdict": verdict(res["lo"], res["hi"])}
    tables = [{r["id"]: r for r in e.get("answer_losses") or []} for e in ea + eb]
    ids = common(tables)
    if ids:
        va = [[t[i]["loss"] for i in ids] for t in tables[:len(ea)]]
        vb = [[t[i]["loss"] for i in ids] for t in tables[len(ea):]]
        res = pooled_paired_bootstrap(va, vb, B, seed, weights=[tables[0][i]["tokens"] for i in ids])
        out["answer_loss"] = {**res, "verdict": verdict(res["lo"], res["hi"], higher_is_better=False)}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-a", nargs="+", required=True, metavar="JSON",
                   help="arm A: eval.py task output(s), one per fine-tuning seed")
    p.add_argument("-b", nargs="+", required=True, metavar="JSON",
                   help="arm B: eval.py task output(s) of the same task, one per fine-tuning seed")
    p.add_argument("--resamples", type=int, default=B_DEFAULT, help=f"bootstrap resamples (default {B_DEFAULT})")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    args = p.parse_args(argv)
    try:
        res = compare_evals(args.a, args.b, args.resamples, args.seed)
    except (ValueError, OSError, KeyError) as e:
        raise SystemExit(f"error: {e}") from None
    for name, r in res.items():
        print(f"{name}: A {r['a']:.4f}  B {r['b']:.4f}  A-B {r['diff']:+.4f}  "
              f"{r['level']:.0%} [{r['lo']:+.4f}, {r['hi']:+.4f}]  n={r['n']}  "
              f"seeds {r['seeds_a']}/{r['seeds_b']}  {r['verdict']}")
    return res


if __name__ == "__main__":
    main()
