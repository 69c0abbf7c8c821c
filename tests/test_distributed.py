"""torchrun with 2 processes on the CPU (gloo) gives what one process gives: the same θ after
training (and after a resumed run), the same samples file from generate.py (also when completing
an interrupted one), the same evaluation file from eval.py, and the same files from the pipeline's
decoding and evaluation steps; a user mistake ends every rank with the same one line."""
import json
import os
import subprocess
import sys

import pytest
import torch

import data
from conftest import ROOT
from softsrv import load_checkpoint
from test_softsrv import TEXTS

ARGS = ["--param", "mc", "--prompt-len", "4", "--hidden", "16", "--lr", "1e-2", "--warmup", "2",
        "--batch-size", "4", "--max-tokens", "32", "--field", "question", "--n-heldout", "4",
        "--eval-every", "3", "--dtype", "fp32"]


def torchrun(script, args, tmp_path, nproc=2, ok=True):
    env = {**os.environ, "SOFTSRV_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          f"--nproc_per_node={nproc}", str(ROOT / script), *args],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert (out.returncode == 0) == ok, out.stderr[-3000:]
    return out


def test_a_mistake_rank_0_meets_ends_every_rank_with_one_line(questions, tmp_path):
    """--model is loaded by rank 0 first (rank0_first); the others must not die waiting for it."""
    out = torchrun("train.py", ARGS + ["--data", str(questions), "--model", str(tmp_path / "nope"),
                                       "--out", str(tmp_path / "o")], tmp_path, ok=False)
    assert out.stderr.count(f"error: {tmp_path / 'nope'}: not a model folder") == 2
    assert "[rank1]: Traceback" not in out.stderr and "[rank0]: Traceback" not in out.stderr


@pytest.fixture
def questions(tmp_path):
    path = tmp_path / "questions.jsonl"
    data.write_jsonl(path, [{"question": t} for t in TEXTS])
    return path


def test_two_processes_train_and_generate_like_one(tiny_backbone, questions, tmp_path):
    import generate as generate_module
    import train as train_module
    common = ARGS + ["--data", str(questions), "--model", str(tiny_backbone)]
    cfg, _ = train_module.parse_args(common + ["--steps", "6", "--out", str(tmp_path / "one")])
    train_module.train(cfg, show_samples=0)

    # 2 processes: 3 steps, then resumed to 6 (rank 0 writes the checkpoint, both read it back)
    torchrun("train.py", common + ["--steps", "3", "--out", str(tmp_path / "two")], tmp_path)
    assert load_checkpoint(tmp_path / "two")[1]["step"] == 3
    out = torchrun("train.py", common + ["--steps", "6", "--out", str(tmp_path / "two"), "--resume"], tmp_path)
    assert out.stdout.count("resuming") == 1                      # only rank 0 prints
    one, rec_one = load_checkpoint(tmp_path / "one")
    two, rec_two = load_checkpoint(tmp_path / "two")
    assert rec_two["step"] == 6 and "2 processes" in out.stdout
    for (name, x), (_, y) in zip(one.state_dict().items(), two.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)
    for a, b in zip(rec_one["history"], rec_two["history"]):
        assert a["step"] == b["step"] and abs(a["heldout_loss"] - b["heldout_loss"]) < 1e-4

    # generation: 3 batches over 2 ranks -> the one-process file, line for line
    gen = ["--ckpt", str(tmp_path / "one"), "--num-samples", "11", "--batch-size", "4", "--max-new-tokens", "8"]
    single = generate_module.generate(str(tmp_path / "one"), n=11, out=str(tmp_path / "single.jsonl"),
                                      batch_size=4, max_new_tokens=8)
    expected = single.read_text().splitlines()
    torchrun("generate.py", gen + ["--out", str(tmp_path / "multi.jsonl")], tmp_path)
    assert (tmp_path / "multi.jsonl").read_text().splitlines() == expected
    # an interrupted file (last batch missing, a torn line) is completed to the same file
    (tmp_path / "multi.jsonl").write_text("\n".join(expected[:8]) + "\n" + expected[8][:20])
    torchrun("generate.py", gen + ["--out", str(tmp_path / "multi.jsonl")], tmp_path)
    assert (tmp_path / "multi.jsonl").read_text().splitlines() == expected


def without_timing(path):
    """An evaluation file without its one timing field (the summary's wall time)."""
    out = json.loads(path.read_text())
    del out["summary"]["seconds"]
    return out


def test_two_processes_evaluate_like_one(tiny_backbone, tmp_path):
    """eval.py under torchrun: the items of the k-shot metric (its shared prefix split off all the
    prompts), of the chat metric and of the answer loss are dealt out; rank 0 writes the file one
    process writes. 5 items on 2 ranks: unequal shares. The reference is a one-process torchrun, so
    that both sides run on one thread."""
    args = ["task", "gsm8k", "--model", str(tiny_backbone), "--limit", "5", "--shots", "2", "--loss-limit", "7",
            "--batch-size", "2", "--dtype", "fp32"]
    one = torchrun("eval.py", args + ["--out", str(tmp_path / "one.json")], tmp_path, nproc=1)
    two = torchrun("eval.py", args + ["--out", str(tmp_path / "two.json")], tmp_path)
    assert two.stdout.count("eval gsm8k: wrote") == 1 and two.stdout.count('"task": "gsm8k"') == 1
    expected = without_timing(tmp_path / "one.json")
    assert len(expected["items"]) == 5 and len(expected["answer_losses"]) == 7
    assert without_timing(tmp_path / "two.json") == expected
    assert json.loads(one.stdout.splitlines()[-1])["answer_loss"] == expected["summary"]["answer_loss"]


def pipeline_args(backbone, method, out):
    # BoolQ: its labels come from the answerer's probabilities, so a random model's answers pass the
    # gates (its free text never ends, and the pipeline drops every unfinished answer)
    return ["--task", "boolq", "--method", method, "--preset", "tiny", "--generator", str(backbone),
            "--answerer", str(backbone), "--student", str(backbone), "--dtype", "fp32", "--out", str(out),
            "--batch-size", "2"]     # several chunks of completions and answers, so both ranks make some


def test_two_processes_run_the_pipeline_like_one(tiny_backbone, tmp_path):
    """pipeline.py under torchrun: both ranks decode steps 1-3 and share the evaluation, rank 0 runs
    decontamination and fine-tuning alone meanwhile, and every file of the decoding steps and every
    evaluation file (its wall time aside) is the one-process file. PT_SR has all three kinds of chunked
    generation (completions, a critique/refine round, answers); SS_NP goes through generate.py, from
    the one-process run's trained θ (DDP's θ matches only to float tolerance, so its samples could differ)."""
    import shutil
    import pipeline as pl
    for method, files in (("pt_sr", ["pt_completions.jsonl", "sr_round1.jsonl"]), ("np", ["generated.jsonl"])):
        one, two = tmp_path / f"{method}-one", tmp_path / f"{method}-two"
        pl.run_pipeline(pl.parse_args(pipeline_args(tiny_backbone, method, one))[0], str(one))
        if method == "np":      # θ and the settings from the one-process run; the train step finds it done
            shutil.copytree(one / "softsrv", two / "softsrv")
            shutil.copy(one / "settings.json", two / "settings.json")
        out = torchrun("pipeline.py", pipeline_args(tiny_backbone, method, two), tmp_path)
        assert "rank 0 alone" in out.stdout and out.stdout.count("[answer] done") == 1
        for name in files + ["questions.jsonl", "answers.jsonl", "data.jsonl"]:   # samples name their checkpoint
            assert (two / name).read_text().replace(str(two), str(one)) == (one / name).read_text(), name
        state_one, state_two = (json.loads((d / "state.json").read_text()) for d in (one, two))
        assert list(state_two) == list(state_one)
        assert state_two["evaluate"]["curve"][0]["step"] == 0 and (two / "report.md").exists()
        evals = sorted(p.name for p in (one / "eval").glob("step-*.json"))
        assert len(evals) > 1 and evals == sorted(p.name for p in (two / "eval").glob("step-*.json"))
        for name in evals:      # fine-tuned checkpoints are named by their folder
            got = json.loads(json.dumps(without_timing(two / "eval" / name)).replace(str(two), str(one)))
            assert got == without_timing(one / "eval" / name), name
        assert state_two["evaluate"]["curve"] == state_one["evaluate"]["curve"]
