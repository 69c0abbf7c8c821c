"""stats.py: paired bootstrap over items, pooling seeds, Wilson interval, verdicts, two eval files."""
import json

import numpy as np
import pytest

import stats


def test_identical_arms_give_exactly_zero_and_a_tie():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, 100).astype(float)
    res = stats.paired_bootstrap(a, a.copy(), B=2000, seed=3)
    assert res["diff"] == 0.0 and res["lo"] == 0.0 and res["hi"] == 0.0
    assert res["lo"] <= 0 <= res["hi"] and stats.verdict(res["lo"], res["hi"]) == "tie"
    losses = rng.uniform(1, 3, 100)
    res = stats.paired_bootstrap(losses, losses, weights=rng.integers(1, 50, 100), B=2000)
    assert res["diff"] == 0.0 and res["lo"] <= 0 <= res["hi"]


def test_clear_difference_excludes_zero():
    rng = np.random.default_rng(2)
    b = (rng.random(200) < 0.2).astype(float)
    a = np.maximum(b, rng.random(200) < 0.5)       # A solves all B solves, and half of the rest
    res = stats.paired_bootstrap(a, b, B=2000)
    assert res["diff"] == pytest.approx(a.mean() - b.mean()) and res["lo"] > 0
    assert res["lo"] <= res["diff"] <= res["hi"]
    assert stats.verdict(res["lo"], res["hi"]) == "A better"
    # losses: A's are lower on every item, so A is better although a - b < 0
    loss_b = rng.uniform(1, 3, 200)
    res = stats.paired_bootstrap(loss_b - 0.1, loss_b, B=2000)
    assert res["hi"] < 0 and stats.verdict(res["lo"], res["hi"], higher_is_better=False) == "A better"
    assert stats.verdict(res["lo"], res["hi"]) == "B better"


def test_small_difference_on_few_items_is_a_tie():
    a, b = np.zeros(100), np.zeros(100)
    a[0] = 1                                   # 1/100 vs 0/100, the pass@1 example
    res = stats.paired_bootstrap(a, b, B=5000)
    assert res["diff"] == pytest.approx(0.01) and res["lo"] == 0.0
    assert stats.verdict(res["lo"], res["hi"]) == "tie"


def test_interval_reproducible_with_seed():
    rng = np.random.default_rng(4)
    a, b = rng.random(50), rng.random(50)
    r1, r2 = stats.paired_bootstrap(a, b, B=500, seed=7), stats.paired_bootstrap(a, b, B=500, seed=7)
    assert r1 == r2
    r3 = stats.paired_bootstrap(a, b, B=500, seed=8)
    assert (r3["lo"], r3["hi"]) != (r1["lo"], r1["hi"]) and r3["diff"] == r1["diff"]


def test_weighted_mean_is_the_token_weighted_loss():
    loss_a, loss_b, tokens = [2.0, 1.0], [1.0, 1.0], [3, 1]
    res = stats.paired_bootstrap(loss_a, loss_b, weights=tokens, B=100)
    assert res["a"] == pytest.approx((2 * 3 + 1) / 4) and res["diff"] == pytest.approx(0.75)


def test_pooled_seeds_average_per_item_first():
    a_seeds = [[1, 0, 1, 1], [1, 1, 0, 1]]
    b_seeds = [[0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0]]
    res = stats.pooled_paired_bootstrap(a_seeds, b_seeds, B=500, seed=0)
    direct = stats.paired_bootstrap(np.mean(a_seeds, 0), np.mean(b_seeds, 0), B=500, seed=0)
    assert {k: res[k] for k in direct} == direct
    assert res["seeds_a"] == 2 and res["seeds_b"] == 3
    assert res["per_seed"] == pytest.approx([0.5, 0.5]) and res["seeds_agree"]
    same = stats.pooled_paired_bootstrap(a_seeds, a_seeds, B=500)
    assert same["diff"] == 0 and same["lo"] == same["hi"] == 0 and not same["seeds_agree"]
    with pytest.raises(ValueError, match="same items"):
        stats.pooled_paired_bootstrap(a_seeds, [[1, 0, 1]], B=10)


def test_wilson_known_values():
    # 95%: 1/100 -> [0.00177, 0.05449]; 0/100 -> [0, 0.03699]; 50/100 -> [0.4038, 0.5962]
    assert stats.wilson(1, 100) == pytest.approx((0.0017674, 0.0544861), abs=1e-6)
    assert stats.wilson(0, 100) == pytest.approx((0.0, 0.0369935), abs=1e-6)
    assert stats.wilson(50, 100) == pytest.approx((0.4038315, 0.5961685), abs=1e-6)
    with pytest.raises(ValueError):
        stats.wilson(3, 2)


def test_bad_input():
    with pytest.raises(ValueError, match="equal-length"):
        stats.paired_bootstrap([1, 0], [1])
    with pytest.raises(ValueError, match="lo"):
        stats.verdict(0.2, 0.1)


def _eval_file(path, correct, losses, tokens, task="gsm8k"):
    items = [{"id": f"q{i}", "correct": c} for i, c in enumerate(correct)]
    al = [{"id": f"q{i}", "loss": l, "tokens": t} for i, (l, t) in enumerate(zip(losses, tokens))]
    path.write_text(json.dumps({"summary": {"task": task}, "items": items, "answer_losses": al}))
    return path


def test_compare_evals(tmp_path, capsys):
    n = 60
    tokens = list(range(1, n + 1))
    a = _eval_file(tmp_path / "a.json", [1] * 30 + [0] * 30, [1.0] * n, tokens)
    b = _eval_file(tmp_path / "b.json", [0] * n, [1.5] * n, tokens)
    res = stats.compare_evals(a, b, B=1000)
    assert set(res) == {"score", "answer_loss"}                # no chat_correct in either file
    assert res["score"]["diff"] == pytest.approx(0.5) and res["score"]["verdict"] == "A better"
    assert res["answer_loss"]["diff"] == pytest.approx(-0.5) and res["answer_loss"]["verdict"] == "A better"
    assert stats.compare_evals(a, a, B=100)["answer_loss"]["verdict"] == "tie"
    stats.main(["-a", str(a), "-b", str(b), "--resamples", "200"])
    assert "answer_loss: A 1.0000  B 1.5000" in capsys.readouterr().out
    # one file per fine-tuning seed: per-item values averaged over an arm's seeds, common items only
    a2 = _eval_file(tmp_path / "a2.json", [0] * 30 + [1] * 30 + [1], [2.0] * (n + 1), tokens + [5])
    res = stats.compare_evals([a, a2], [b], B=1000)
    assert res["score"]["n"] == n and res["score"]["diff"] == pytest.approx(0.5)
    assert res["score"]["per_seed"] == pytest.approx([0.5]) and res["score"]["seeds_a"] == 2   # seed pairs: 1
    assert res["answer_loss"]["a"] == pytest.approx(1.5) and res["answer_loss"]["verdict"] == "tie"
    c = _eval_file(tmp_path / "c.json", [0], [1.0], [1], task="boolq")
    with pytest.raises(ValueError, match="boolq"):
        stats.compare_evals(a, c)
