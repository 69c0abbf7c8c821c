"""MAUVE of each sweep sample file against non-test data (the 100 examples train.py held out of
training; the 889 training questions) and against the 330 held-out test questions (issue 8).
k-means seeds 1-5: mean and min-max. Features: E = smollm2-135m-instruct, mauve.py's default (bf16)."""
import glob, json, os, sys
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo root
from mauve import _load_texts, compute_mauve, featurize
from softsrv import TrainConfig, load_training_data

S = "/work/main/runs/sweep"
train_ex, _ = load_training_data(TrainConfig())
refs = {"heldout100": (featurize(_load_texts(f"{S}/heldout100.jsonl", None, "--ref"), progress=False), 10),
        "train889": (featurize([e.text for e in train_ex], progress=False), 32),
        "test330": (featurize(_load_texts("gsm8k:test", None, "--ref"), progress=False), 32)}
rows = {}
for path in sorted(sys.argv[1:] or glob.glob(f"{S}/samples_*.jsonl")):
    texts = _load_texts(path, None, "--gen")
    p = featurize(texts, progress=False)
    rows[path] = {"n": len(texts)}
    for name, (q, k) in refs.items():
        m = [compute_mauve(p, q, num_buckets=k, seed=s).mauve for s in range(1, 6)]
        rows[path][name] = {"buckets": k, "mean": float(np.mean(m)), "min": float(min(m)), "max": float(max(m))}
    print(path.split("/")[-1], len(texts), "  ".join(f"{n} {r['mean']:.3f} [{r['min']:.3f}, {r['max']:.3f}]"
          for n, r in rows[path].items() if n != "n"), flush=True)
json.dump(rows, open(f"{S}/scores.json", "w"), indent=1)
