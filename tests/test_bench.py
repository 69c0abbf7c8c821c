"""bench.py runs every workload on a tiny model and writes the keys issue 10 asks for (no timing asserted)."""
import pytest

from conftest import has_package


@pytest.mark.skipif(not has_package("transformers"), reason="bench.py compares against transformers")
def test_bench_quick_smoke(tiny_backbone):
    import bench
    cfg = bench.BenchConfig.quick(model=str(tiny_backbone), decode_new=2, finetune_len=96)
    out = bench.run(cfg, ["fp32", "bf16"], log=lambda *_: None)
    for k in bench.KEYS + ["matmul_gflops_fp32", "matmul_gflops_bf16", "peak_rss_mb", "cpu_flags", "by_dtype"]:
        assert k in out, k
    assert set(out["decode_tok_s"]) == {1, 4} and set(out["by_dtype"]) == {"fp32", "bf16"}
    assert all(v > 0 for v in out["decode_tok_s"].values()) and out["finetune_tok_s"] > 0
    assert out["by_dtype"][bench.auto_dtype()]["train_tok_s"] == out["train_tok_s"] and out["dtype"] == bench.auto_dtype()
    assert "| decode b4 | bf16 |" in bench.table(out)
    # the generation workloads: every side ran and generated tokens; greedy sides agree on them
    assert set(out["answer"]) == {"before", "after", "hf"} and set(out["fewshot"]) == {"before", "continuous", "after", "hf"}
    for w in ("answer", "fewshot"):
        sides = out["by_dtype"]["fp32"][w]
        assert all(v["tok_s"] > 0 for v in sides.values())
        assert len({v["tokens"] for k, v in sides.items() if k != "hf"}) == 1
    assert "| answer | fp32 |" in bench.table(out) and "| fewshot | bf16 |" in bench.table(out)


def test_generation_sides_give_the_same_greedy_tokens(tiny_backbone):
    """before (batch at a time), continuous and after (+ shared prefix) decode the same tokens."""
    import bench
    from weights import load_model, load_tokenizer
    model, tok = load_model(tiny_backbone), load_tokenizer(tiny_backbone)
    cfg = bench.BenchConfig.quick(model=str(tiny_backbone))
    for make in (bench.answer_sides, bench.fewshot_sides):
        sides = make(model, None, tok, cfg)
        outs = [fn() for k, fn in sides.items() if k != "hf"]
        assert all(o == outs[0] for o in outs[1:]) and sum(map(len, outs[0])) > 0


def test_packed_batch_targets_stay_inside_segments():
    import bench
    ids, labels, seg = bench.packed_batch(bench.BenchConfig(finetune_rows=2, finetune_len=300), vocab=50)
    assert int(seg[0].max()) >= 1                         # several examples per row
    inside = seg[:, 1:] == seg[:, :-1]
    assert (labels[:, :-1][inside] == ids[:, 1:][inside]).all()
    assert (labels[:, :-1][~inside] == -100).all() and (labels[:, -1] == -100).all()


@pytest.mark.skipif(not has_package("transformers"), reason="bench.py builds transformers' side too")
def test_bench_profile_prints_the_per_op_table(tiny_backbone, capsys):
    import bench
    bench.main(["--model", str(tiny_backbone), "--quick", "--dtype", "fp32", "--profile", "decode4"])
    out = capsys.readouterr().out
    assert "Self CPU" in out and "aten::" in out
    with pytest.raises(SystemExit):
        bench.main(["--model", str(tiny_backbone), "--profile", "decoding"])
