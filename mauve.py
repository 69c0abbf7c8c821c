"""MAUVE (Pillutla et al. 2021; paper Sec. 3.8 and Appendix A.7): how close generated texts are to
reference texts, as one number in (0, 1], 1 = the same distribution.

    python eval.py mauve --gen out/ss_mc/samples.jsonl --ref gsm8k:test --buckets 32
    python mauve.py --gen out/ss_mc/samples.jsonl --ref gsm8k:test --buckets 32   # the same command

The steps, as the reference implementation (mauve-text 0.4.0, `compute_mauve`) does them:
1. features: one vector per text, the mean of a small LM's final hidden states over its tokens,
   i.e. the context encoder E of SoftSRV (App. A.7 uses the same model as E);
2. quantization: L2-normalize every row, fit a PCA on both sets together and keep the components
   that explain `pca_explained_var` of the variance, k-means on both sets together; the cluster
   histograms are p (generated texts) and q (reference texts);
3. the divergence curve C(p, q) = {(exp(-c KL(q|r_λ)), exp(-c KL(p|r_λ))) : r_λ = λp + (1-λ)q};
4. MAUVE = the area under C.
Only step 2's k-means differs from the reference (scikit-learn's instead of faiss's), so on the
same features the score moves by about the k-means noise; steps 3-4 are the same numbers.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

import data
import options
from runtime import DTYPES, default_device, dtype_of, keep_freed_memory
from softsrv import ContextEncoder
from weights import CACHE_DIR, DEFAULT_MODEL, load_model, load_tokenizer

PLOT_REQUIREMENT = "matplotlib==3.11.2"          # requirements-plot.txt: the optional extra for --plot


@dataclass
class MauveResult:
    mauve: float                  # area under the divergence curve
    divergence_curve: np.ndarray  # [n_lambdas + 2, 2]: (exp(-c KL(q|r)), exp(-c KL(p|r))), end points included
    p_hist: np.ndarray            # [num_buckets] cluster histogram of the generated texts
    q_hist: np.ndarray            # [num_buckets] cluster histogram of the reference texts
    num_buckets: int


# ----------------------------------------------------------------------------------------------
# Steps 3-4: histograms -> divergence curve -> area (exact; the same numbers as the reference)

def kl_divergence(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KL(a|b) of a [m] against each row of b [n, m]: 0 log 0 = 0, and inf where b = 0 < a."""
    s = a > 0
    with np.errstate(divide="ignore"):
        return np.sum(a[s] * np.log(a[s] / b[:, s]), axis=1)


def divergence_curve(p_hist: np.ndarray, q_hist: np.ndarray, c: float = 5.0, n_lambdas: int = 25) -> np.ndarray:
    """C(p, q) (Pillutla et al. Eq. 1) on the reference's grid: λ = n_lambdas points from 1e-6 to
    1 - 1e-6, with the two end points λ = 0 -> (1, 0) and λ = 1 -> (0, 1) added (as KL = 0 / inf)."""
    lambdas = np.linspace(1e-6, 1 - 1e-6, n_lambdas)[:, None]
    r = lambdas * p_hist + (1 - lambdas) * q_hist                     # [n_lambdas, buckets]
    kl = np.stack([kl_divergence(q_hist, r), kl_divergence(p_hist, r)], axis=1)
    kl = np.concatenate([[[0.0, np.inf]], kl, [[np.inf, 0.0]]])
    return np.exp(-c * kl)


def _check_histogram(h, name: str) -> np.ndarray:
    h = np.asarray(h, dtype=np.float64)
    if h.ndim != 1 or h.size == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D histogram, got shape {h.shape}")
    if not np.isfinite(h).all() or (h < 0).any() or h.sum() <= 0:
        raise ValueError(f"{name}: a histogram needs finite, non-negative entries with a positive sum")
    return h / h.sum()


def mauve_from_histograms(p_hist, q_hist, c: float = 5.0, n_lambdas: int = 25) -> tuple[float, np.ndarray]:
    """(MAUVE, divergence curve) of two histograms over the same buckets (normalized here)."""
    p, q = _check_histogram(p_hist, "p_hist"), _check_histogram(q_hist, "q_hist")
    if p.shape != q.shape:
        raise ValueError(f"p_hist and q_hist have different numbers of buckets ({p.size} vs {q.size})")
    if c <= 0 or n_lambdas < 1:
        raise ValueError(f"need c > 0 and n_lambdas >= 1, got c={c}, n_lambdas={n_lambdas}")
    curve = divergence_curve(p, q, c, n_lambdas)
    x, y = curve.T
    # The reference's area: trapezoids of y over x sorted, and of x over y sorted, averaged. On a
    # monotone curve both are the same area; sorting makes the trapezoid rule well defined on ties.
    ix, iy = np.argsort(x), np.argsort(y)
    area = 0.5 * (np.trapezoid(y[ix], x[ix]) + np.trapezoid(x[iy], y[iy]))
    return float(area), curve


# ----------------------------------------------------------------------------------------------
# Step 2: features -> cluster histograms

def auto_buckets(n_p: int, n_q: int) -> int:
    """The reference's default: one bucket per 10 texts of the smaller set, at least 2."""
    return max(2, int(round(min(n_p, n_q) / 10)))


def _check_features(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array [n_texts, dim], got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: empty (shape {x.shape}); MAUVE needs at least one text on each side")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return x


def compute_mauve(p_features, q_features, num_buckets="auto", pca_explained_var: float = 0.9,
                  kmeans_num_redo: int = 5, kmeans_max_iter: int = 500, c: float = 5.0, n_lambdas: int = 25,
                  seed: int = 1) -> MauveResult:
    """MAUVE of generated texts p against reference texts q, given their features [n_p, d], [n_q, d]."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    p, q = _check_features(p_features, "p_features"), _check_features(q_features, "q_features")
    if p.shape[1] != q.shape[1]:
        raise ValueError(f"p_features and q_features have different widths ({p.shape[1]} vs {q.shape[1]}): "
                         f"featurize both with the same model")
    k = auto_buckets(len(p), len(q)) if num_buckets == "auto" else num_buckets
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= len(p) + len(q):
        raise ValueError(f"num_buckets must be 'auto' or an integer from 1 to the number of texts "
                         f"({len(p) + len(q)}), got {num_buckets!r}")
    if not 0 < pca_explained_var < 1:
        raise ValueError(f"pca_explained_var must be in (0, 1), got {pca_explained_var}")

    x = np.vstack([q, p])                 # q first, as the reference stacks them (k-means init sees this order)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    pca = PCA().fit(x)
    dims = int(np.argmax(np.cumsum(pca.explained_variance_ratio_) >= pca_explained_var)) + 1
    x = pca.transform(x)[:, :dims]
    labels = KMeans(int(k), n_init=kmeans_num_redo, max_iter=kmeans_max_iter, random_state=seed).fit(x).labels_
    q_hist = np.bincount(labels[: len(q)], minlength=k) / len(q)
    p_hist = np.bincount(labels[len(q):], minlength=k) / len(p)
    score, curve = mauve_from_histograms(p_hist, q_hist, c, n_lambdas)
    return MauveResult(score, curve, p_hist, q_hist, int(k))


# ----------------------------------------------------------------------------------------------
# Step 1: texts -> features, with SoftSRV's context encoder E and its cache

@functools.lru_cache(maxsize=1)
def _encoder(model: str, dtype: str, max_tokens: int, batch_size: int):
    """E for `model`, loaded once per process (featurizing p and q shares it), and only when a text
    is not in the feature cache."""
    device = default_device()
    lm = load_model(model, dtype=dtype_of(dtype, device), device=device)
    return ContextEncoder(lm, load_tokenizer(model), max_tokens=max_tokens, batch_size=batch_size)


def _text_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def feature_dir(model: str, dtype: str, max_tokens: int) -> Path:
    """Where E(x) features of (model, resolved dtype, max_tokens) are cached, text by text: shards of
    (text hash, feature) rows under the context cache (SOFTSRV_CACHE/features)."""
    key = hashlib.sha256(f"{model}|{dtype}|{max_tokens}".encode()).hexdigest()[:20]
    return CACHE_DIR / "features" / key


def _cached_features(folder: Path) -> dict[bytes, np.ndarray]:
    known: dict[bytes, np.ndarray] = {}
    for shard in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            t = load_file(str(shard))
        except Exception:                       # a torn or foreign file: ignore it, it is rewritten
            continue
        known.update(zip(map(bytes, t["hash"]), t["z"]))
    return known


def featurize(texts: list[str], model: str = DEFAULT_MODEL, dtype: str = "auto", batch_size: int = 16,
              max_tokens: int = 256, progress: bool = True) -> np.ndarray:
    """texts -> [n, d] float32: E(x) of each text (App. A.7: the same LM as the context encoder), in
    the run's precision ('auto': runtime.dtype_of's choice for this machine).

    Cached text by text under (model, precision, max_tokens): a text featurized once, by any run or
    set (the train fold, the test questions), is read back, and only new texts load and run the
    encoder. A text's feature is the one of the batch it was first encoded in (batches differ in
    the last bits, as in any batched forward)."""
    if len(texts) == 0:
        raise ValueError("featurize: no texts")
    if dtype not in DTYPES:
        raise ValueError(f"featurize: dtype must be one of {DTYPES}, got {dtype!r}")
    resolved = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype_of(dtype, default_device())]
    folder = feature_dir(str(model), resolved, max_tokens)
    known = _cached_features(folder)
    keys = [_text_key(t) for t in texts]
    todo = list(dict.fromkeys(k for k in keys if k not in known))
    if todo:
        first = {k: t for k, t in zip(keys, texts)}
        encoder = _encoder(str(model), resolved, max_tokens, batch_size)
        z = encoder([first[k] for k in todo], progress=progress).numpy().astype(np.float32)
        known.update(zip(todo, z))
        digest = hashlib.sha256(b"".join(todo)).hexdigest()[:20]
        shard = {"hash": np.frombuffer(b"".join(todo), dtype=np.uint8).reshape(len(todo), -1), "z": z}
        data.atomic_write(folder / f"{digest}.safetensors", lambda tmp: save_file(shard, str(tmp)))
    return np.stack([known[k] for k in keys]).astype(np.float32)


def mauve_texts(p_texts: list[str], q_texts: list[str], model: str = DEFAULT_MODEL, dtype: str = "auto",
                **compute_kw) -> MauveResult:
    """MAUVE of generated texts p_texts against reference texts q_texts, features in `dtype`."""
    return compute_mauve(featurize(p_texts, model, dtype), featurize(q_texts, model, dtype), **compute_kw)


# ----------------------------------------------------------------------------------------------
# Plot and CLI

def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError(f"--plot needs matplotlib: pip install {PLOT_REQUIREMENT}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(result: MauveResult, path):
    """The divergence curve (its area is MAUVE) and, beside it, the two cluster histograms."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 1.6]})
    x, y = result.divergence_curve.T
    order = np.argsort(x)
    ax1.fill_between(x[order], y[order], alpha=0.25)
    ax1.plot(x[order], y[order], marker=".")
    ax1.set(xlim=(0, 1), ylim=(0, 1), aspect="equal", title=f"divergence curve, MAUVE = {result.mauve:.4f}",
            xlabel="exp(-c KL(q | r_λ))  (reference)", ylabel="exp(-c KL(p | r_λ))  (generated)")
    buckets = np.argsort(-result.q_hist, kind="stable")   # the reference's buckets, largest first
    pos = np.arange(result.num_buckets)
    ax2.bar(pos - 0.2, result.p_hist[buckets], 0.4, label="p: generated")
    ax2.bar(pos + 0.2, result.q_hist[buckets], 0.4, label="q: reference")
    ax2.set(title=f"cluster histograms ({result.num_buckets} buckets, by q's mass)", xlabel="bucket",
            ylabel="fraction of texts")
    ax2.legend()
    fig.tight_layout()
    path = Path(path)
    data.atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=110))
    plt.close(fig)


def _load_texts(spec: str, field: str | None, option: str) -> list[str]:
    """--gen / --ref: a file, or a registered dataset with an optional split ("gsm8k:test")."""
    name, _, split = spec.partition(":")
    try:
        if name in data.DATASETS:
            examples = data.load_examples(name, split=split or "train", field=field)
        else:
            examples = data.load_examples(spec, field=field)
    except ValueError as e:
        raise ValueError(f"{option}: {e}") from None
    return [e.text for e in examples]


def _buckets(value: str):
    if value == "auto":
        return value
    try:
        k = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {value!r}") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {k}")
    return k


def cli(argv=None) -> MauveResult | None:
    p = argparse.ArgumentParser(prog="eval.py mauve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--gen", required=True, help="generated texts (p): a .jsonl/.json/.txt file, or a registered dataset "
                                   "with an optional split, e.g. gsm8k:test (required)")
    a("--ref", required=True, help="reference texts (q), same forms as --gen; the paper uses the task's "
                                   "test fold, here gsm8k:test (required)")
    a("--field", help="text field of --gen when it is a JSON file; dotted paths reach into objects (default text)")
    a("--ref-field", help="text field of --ref when it is a JSON file (default text)")
    a("--buckets", type=_buckets, default="auto",
      help="k-means clusters: an integer, or auto = max(2, round(min(n_gen, n_ref) / 10)), the reference's "
           "default; the paper (App. A.7) uses 32 for every domain (default auto)")
    a("--plot", help=f"write the divergence curve and the two histograms to this image (.png); needs "
                     f"{PLOT_REQUIREMENT} (pip install -r requirements-plot.txt) (default: no plot)")
    a("--model", default=DEFAULT_MODEL, type=options.model, help=f"LM whose mean final hidden state is a text's feature, "
                                             f"as for the context encoder E (default {DEFAULT_MODEL})")
    a("--dtype", choices=DTYPES, default="auto",
      help="precision of the feature model; auto = what runtime.dtype_of picks on this machine (default auto)")
    a("--json", help="also write the score, the sizes, the histograms and the curve to this JSON file (default: none)")
    a("--seed", type=options.seed, default=1, help="k-means seed (default 1)")
    args = p.parse_args(argv)
    try:
        if args.plot:
            _pyplot()                     # ask for the missing extra before minutes of featurizing
        t0 = time.time()
        gen = _load_texts(args.gen, args.field, "--gen")
        ref = _load_texts(args.ref, args.ref_field, "--ref")
        print(f"texts: gen {args.gen} {len(gen)}, ref {args.ref} {len(ref)}", flush=True)
        p_feat, q_feat = featurize(gen, args.model, args.dtype), featurize(ref, args.model, args.dtype)
        print(f"features: {args.model}, {p_feat.shape[1]} dims, {time.time() - t0:.1f} s", flush=True)
        t1 = time.time()
        result = compute_mauve(p_feat, q_feat, num_buckets=args.buckets, seed=args.seed)
        print(f"quantized: {result.num_buckets} buckets, {time.time() - t1:.1f} s", flush=True)
        print(f"MAUVE {result.mauve:.4f}  (gen {len(gen)} texts vs ref {len(ref)} texts, "
              f"{result.num_buckets} buckets, seed {args.seed})")
        if args.plot:
            plot(result, args.plot)
            print(f"wrote {args.plot}")
        if args.json:
            record = {"mauve": result.mauve, "gen": args.gen, "ref": args.ref, "n_gen": len(gen), "n_ref": len(ref),
                      "num_buckets": result.num_buckets, "seed": args.seed, "model": args.model,
                      "p_hist": result.p_hist.tolist(), "q_hist": result.q_hist.tolist(),
                      "divergence_curve": result.divergence_curve.tolist()}
            data.atomic_write(Path(args.json), lambda tmp: tmp.write_text(json.dumps(record, indent=2)))
            print(f"wrote {args.json}")
    except ValueError as e:
        sys.exit(f"error: {e}")
    return result


if __name__ == "__main__":
    keep_freed_memory()   # before the first big allocation (model.py says why)
    cli()
