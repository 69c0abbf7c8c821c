"""Issue 23, one test (or more) per defect: one run per folder and per output file, every option
range-checked at parse time, user input never repaired, damaged files named in one line, the
report's Command line reproducing the run. Each test failed on the code before the fix; the list
with the defects is in docs/reliability.md."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import data
from conftest import QUESTIONS, ROOT


def _env(tmp_path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "SOFTSRV_CACHE": str(tmp_path / "cache")}


def _tiny_pipeline(backbone, out, *extra) -> list[str]:
    return ["--task", "gsm8k", "--preset", "tiny", "--generator", str(backbone), "--answerer", str(backbone),
            "--student", str(backbone), "--dtype", "fp32", "--out", str(out), *extra]


@pytest.fixture
def questions(tmp_path) -> Path:
    path = tmp_path / "questions.jsonl"
    data.write_jsonl(path, [{"question": q} for q in QUESTIONS])
    return path


def _train_argv(backbone, questions, out, *extra) -> list[str]:
    return ["--param", "np", "--prompt-len", "4", "--steps", "2", "--eval-every", "2", "--batch-size", "4",
            "--max-tokens", "16", "--data", str(questions), "--field", "question", "--n-heldout", "4",
            "--model", str(backbone), "--out", str(out), "--dtype", "fp32", "--lr", "1e-2", "--warmup", "0",
            *extra]


@pytest.fixture
def checkpoint(tiny_backbone, questions, tmp_path) -> Path:
    from softsrv import train
    from train import parse_args
    cfg, _ = parse_args(_train_argv(tiny_backbone, questions, tmp_path / "ck"))
    train(cfg, show_samples=0)
    return tmp_path / "ck"


# ---------------------------------------------------------------------------------------------
# 1. one process per run folder / output file

def test_second_pipeline_on_a_folder_is_refused_naming_the_holder(tiny_backbone, tmp_path):
    import pipeline as pl
    out = tmp_path / "run"
    cfg, _, _ = pl.parse_args(_tiny_pipeline(tiny_backbone, out, "--method", "pt"))
    run = pl.Run(cfg, out)                  # this process holds the folder
    try:
        got = subprocess.run([sys.executable, str(ROOT / "pipeline.py"),
                              *_tiny_pipeline(tiny_backbone, out, "--method", "pt", "--stop-after", "generate")],
                             capture_output=True, text=True, timeout=300, env=_env(tmp_path))
    finally:
        run.close()
    err = got.stderr.strip().splitlines()
    assert got.returncode == 1 and len(err) == 1, got.stderr
    assert f"pid {os.getpid()} on {socket.gethostname()}, started " in err[0] and str(out) in err[0]
    assert sorted(p.name for p in out.iterdir()) == [".lock", "settings.json"]     # nothing of the 2nd
    pl.run_pipeline(cfg, str(out), stop_after="generate")          # released: the folder is usable


def test_two_pipelines_started_together_write_each_record_once(tiny_backbone, tmp_path):
    out = tmp_path / "run"
    # BoolQ: its labels come from the answerer's probabilities, so a random model's answers pass the
    # answer step's gates and the run reaches data.jsonl
    cmd = [sys.executable, str(ROOT / "pipeline.py"),
           *_tiny_pipeline(tiny_backbone, out, "--method", "pt", "--stop-after", "decontam"), "--task", "boolq"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path))
             for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 1], results
    refused = next(err for rc, err in results if rc == 1)
    # the holder is named once it has written its pid; a second earlier than that meets "just starting"
    assert "in use by" in refused.strip().splitlines()[-1]
    for name in ("pt_completions.jsonl", "answers.jsonl"):
        idx = [r["index"] for r in data.read_jsonl(out / name)]
        assert idx == sorted(set(idx)), name
    pairs = data.read_jsonl(out / "data.jsonl")
    state = json.loads((out / "state.json").read_text())
    assert len({p["id"] for p in pairs}) == len(pairs) == state["decontam"]["kept"]


def test_a_killed_holder_leaves_no_stuck_lock(tmp_path):
    lock = tmp_path / "run" / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, data\n"
                               f"held = data.lock({str(lock)!r}, 'the run')\nprint('held', flush=True)\n"
                               "time.sleep(600)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=rf"the run: in use by pid {holder.pid} on "):
            data.lock(lock, "the run")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    data.lock(lock, "the run").close()     # the kernel released it with the process


def test_generate_refuses_to_continue_a_file_from_another_checkpoint(tiny_backbone, questions, checkpoint, tmp_path):
    from softsrv import generate
    from softsrv import train
    from train import parse_args
    other, _ = parse_args(_train_argv(tiny_backbone, questions, tmp_path / "other", "--seed", "1"))
    train(other, show_samples=0)
    out = tmp_path / "samples.jsonl"
    generate(str(checkpoint), n=4, out=str(out), batch_size=4, max_new_tokens=4)
    before = out.read_bytes()
    for n in (4, 8):            # "all there" and "append more": both would mix two checkpoints
        with pytest.raises(ValueError, match=r"samples.jsonl: holds samples from another checkpoint .*theta"):
            generate(str(tmp_path / "other"), n=n, out=str(out), batch_size=4, max_new_tokens=4)
    assert out.read_bytes() == before
    rec = data.read_jsonl(out)[0]
    assert rec["checkpoint"] == str(checkpoint.resolve()) and len(rec["theta"]) == 16 and rec["step"] == 2


def test_generate_refuses_an_output_file_in_use(checkpoint, tmp_path):
    from softsrv import generate
    out = tmp_path / "samples.jsonl"
    held = data.lock(tmp_path / ".samples.jsonl.lock", str(out))
    try:
        with pytest.raises(ValueError, match=rf"samples.jsonl: in use by pid {os.getpid()}"):
            generate(str(checkpoint), n=4, out=str(out), batch_size=4, max_new_tokens=4)
    finally:
        held.close()
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# 2, 5, 6. every option range-checked at parse time, before anything is written or loaded

BAD_OPTIONS = [
    ("pipeline", ["--temperature", "-1"], "--temperature"),
    ("pipeline", ["--top-p", "0"], "--top-p"),
    ("pipeline", ["--top-p", "1.5"], "--top-p"),
    ("pipeline", ["--train-steps", "0"], "--train-steps"),
    ("pipeline", ["--train-steps", "-1"], "--train-steps"),
    ("pipeline", ["--ft-lr", "0"], "--ft-lr"),
    ("pipeline", ["--seed", "-1"], "--seed"),
    ("train", ["--lr", "0"], "--lr"),
    ("train", ["--warmup", "-5"], "--warmup"),
    ("train", ["--n-heldout", "0"], "--n-heldout"),
    ("finetune", ["--lr", "0"], "--lr"),
    ("finetune", ["--warmup", "-5"], "--warmup"),
    ("generate", ["--max-new-tokens", "0"], "--max-new-tokens"),
    ("generate", ["--max-new-tokens", "-5"], "--max-new-tokens"),
    ("generate", ["--temperature", "nan"], "--temperature"),
]


@pytest.mark.parametrize("script,argv,option", BAD_OPTIONS, ids=[f"{s} {' '.join(a)}" for s, a, _ in BAD_OPTIONS])
def test_option_out_of_range_is_refused_at_parse_time(script, argv, option, tmp_path, capsys):
    import importlib
    out = tmp_path / "out"
    # the rest of each command would fail fast on a missing file if the option got through
    rest = {"pipeline": ["--preset", "tiny", "--generator", str(tmp_path / "missing"), "--out", str(out)],
            "train": ["--data", str(tmp_path / "missing.jsonl"), "--out", str(out)],
            "finetune": ["--data", str(tmp_path / "missing.jsonl"), "--out", str(out)],
            "generate": ["--ckpt", str(tmp_path / "missing"), "--out", str(out)]}[script]
    with pytest.raises(SystemExit) as e:
        importlib.import_module(script).main(argv + rest)
    assert e.value.code == 2
    assert re.fullmatch(rf"\S+: error: argument {option}: must be .*", capsys.readouterr().err.splitlines()[-1])
    assert not out.exists() and sorted(os.listdir(tmp_path)) == []


def test_relative_paths_are_recorded_absolute(tmp_path, monkeypatch):
    import finetune
    import train
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    cfg, _ = train.parse_args(["--data", "q.jsonl", "--model", "m"])
    assert cfg.data == str(tmp_path / "q.jsonl") and cfg.model == cfg.embed_model == str(tmp_path / "m")
    assert train.parse_args(["--data", "gsm8k"])[0].data == "gsm8k"       # a registered name stays a name
    assert train.parse_args(["--data", "gsm8kk"])[0].data == "gsm8kk"     # and a typo is reported as one
    assert finetune.parse_args(["--data", "pairs.jsonl"]).data == str(tmp_path / "pairs.jsonl")


# ---------------------------------------------------------------------------------------------
# 3. user input is never repaired

def test_malformed_last_line_of_a_user_file_is_an_error(tmp_path):
    import mauve
    import student
    path = tmp_path / "user.jsonl"
    path.write_text('{"text": "a", "question": "q1", "answer": "a1"}\n'
                    '{"text": "b", "question": "q2", "answer": "a2"}\n{"text": "c", "quest')
    line3 = r"user.jsonl:3: not valid JSON .*cut off"
    with pytest.raises(ValueError, match=line3):
        data.read_jsonl(path)
    with pytest.raises(ValueError, match=line3):                  # train.py --data
        data.load_examples(str(path))
    with pytest.raises(ValueError, match=line3):                  # finetune.py --data
        student.load_pairs(str(path))
    with pytest.raises(ValueError, match="--gen: .*" + line3):    # eval.py mauve --gen
        mauve._load_texts(str(path), None, "--gen")
    assert len(data.read_jsonl(path, repair=True)) == 2           # only for the project's own appends


# ---------------------------------------------------------------------------------------------
# 4. a failed first attempt leaves nothing that refuses the corrected command

def test_corrected_command_runs_after_a_failed_first_attempt(tiny_backbone, tmp_path):
    import pipeline as pl
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        pl.main(_tiny_pipeline(tmp_path / "nope-model", out, "--method", "pt"))
    assert "nope-model" in str(e.value) and "\n" not in str(e.value)
    assert not (out / "settings.json").exists()
    with pytest.raises(SystemExit) as e:
        pl.main(_tiny_pipeline(tiny_backbone, out, "--method", "np", "--train-steps", "-1"))
    assert e.value.code == 2 and not (out / "settings.json").exists()
    pl.main(_tiny_pipeline(tiny_backbone, out, "--method", "np", "--train-steps", "2", "--stop-after", "train"))
    assert json.loads((out / "settings.json").read_text())["train_steps"] == 2
    assert list(json.loads((out / "state.json").read_text())) == ["train"]


def test_damaged_weights_of_a_model_are_refused_before_settings_are_written(tiny_backbone, tmp_path):
    import shutil
    import pipeline as pl
    broken = tmp_path / "broken"
    shutil.copytree(tiny_backbone, broken)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:20])
    with pytest.raises(SystemExit) as e:
        pl.main(_tiny_pipeline(tiny_backbone, tmp_path / "run", "--method", "pt", "--student", str(broken)))
    assert re.fullmatch(r"error: \S+broken/model.safetensors: unreadable or truncated safetensors file .*", str(e.value))
    assert not (tmp_path / "run" / "settings.json").exists()


# ---------------------------------------------------------------------------------------------
# 5. every file read back fails with one line naming it

def _one_line_error(argv_main, argv) -> str:
    with pytest.raises(SystemExit) as e:
        argv_main(argv)
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def test_truncated_theta_is_one_line_naming_it(checkpoint, tiny_backbone, questions):
    import generate
    import train
    theta = checkpoint / "theta.safetensors"
    theta.write_bytes(theta.read_bytes()[:30])
    msg = _one_line_error(generate.main, ["--ckpt", str(checkpoint), "--n", "2"])
    assert f"{theta}: unreadable or truncated safetensors file" in msg
    msg = _one_line_error(train.main, _train_argv(tiny_backbone, questions, checkpoint, "--steps", "4", "--resume"))
    assert f"{theta}: unreadable or truncated safetensors file" in msg


def test_truncated_train_state_is_one_line_naming_it(checkpoint, tiny_backbone, questions):
    import train
    state = checkpoint / "train_state.safetensors"
    state.write_bytes(state.read_bytes()[:7])
    msg = _one_line_error(train.main, _train_argv(tiny_backbone, questions, checkpoint, "--steps", "4", "--resume"))
    assert f"{state}: unreadable or truncated safetensors file" in msg


def test_checkpoint_config_missing_a_key_or_not_json_is_one_line_naming_it(checkpoint):
    import generate
    config = checkpoint / "config.json"
    rec = json.loads(config.read_text())
    del rec["soft_prompt"]["t"]
    config.write_text(json.dumps(rec))
    msg = _one_line_error(generate.main, ["--ckpt", str(checkpoint), "--n", "2"])
    assert f"{config}: damaged checkpoint record, missing soft_prompt.t" in msg
    config.write_text('{"step": 2, "soft')
    msg = _one_line_error(generate.main, ["--ckpt", str(checkpoint), "--n", "2"])
    assert f"{config}: not valid JSON" in msg


def test_damaged_run_settings_are_one_line_naming_them(tiny_backbone, tmp_path):
    import pipeline as pl
    out = tmp_path / "run"
    out.mkdir()
    (out / "settings.json").write_text('{"task": "gsm8k", ')
    msg = _one_line_error(pl.main, _tiny_pipeline(tiny_backbone, out, "--method", "pt"))
    assert f"{out / 'settings.json'}: not valid JSON" in msg


# ---------------------------------------------------------------------------------------------
# 6. the report's Command line; help texts and comments cite what exists

def test_report_command_line_reproduces_every_non_default_setting(tmp_path):
    import shlex
    import pipeline as pl
    argv = ["--task", "mbpp", "--method", "pt", "--preset", "tiny", "--temperature", "0.7", "--pt-top-p", "0.5",
            "--ft-lr", "1e-05", "--answer-tokens", "20", "--generator", str(tmp_path), "--seed", "3"]
    cfg, _, _ = pl.parse_args(argv)
    line = pl.command_line(cfg, tmp_path / "run dir")
    for option in ("--temperature 0.7", "--pt-top-p 0.5", "--ft-lr 1e-05", "--answer-tokens 20", "--seed 3"):
        assert option in line
    words = shlex.split(line)
    assert words[:2] == ["python", "pipeline.py"]
    again, out, _ = pl.parse_args(words[2:])
    assert again == cfg and out == str(tmp_path / "run dir")
    plain, _, _ = pl.parse_args(["--preset", "tiny"])
    assert pl.command_line(plain, "r") == "python pipeline.py --task gsm8k --method mc --preset tiny --out r"


def test_help_texts_cite_no_spec_section(capsys):
    import eval as ev
    import finetune
    for main in (ev.main, finetune.main):
        with pytest.raises(SystemExit):
            main(["--help"])
        assert "SPEC" not in capsys.readouterr().out


def test_comments_cite_only_readme_sections_that_exist():
    headings = [h.strip("#* ").lower() for h in (ROOT / "README.md").read_text().splitlines()
                if h.startswith(("#", "**"))]             # headings and bold paragraph titles
    cited = []
    for path in ROOT.glob("*.py"):
        for m in re.finditer(r'README(?:\'s)?(?:, |: | )?"([^"]+)"|README: ([A-Z][\w ]*\w)', path.read_text()):
            cited.append((path.name, m.group(1) or m.group(2)))
    missing = [(f, s) for f, s in cited if not any(s.lower() in h for h in headings)]
    assert not missing
    # the studies live in docs/: every docs/ file a module cites exists
    docs = {(p.name, m.group(0)) for p in ROOT.glob("*.py")
            for m in re.finditer(r"docs/[\w/.-]+?\.(?:md|py|sh)", p.read_text())}
    assert docs and not [(f, d) for f, d in docs if not (ROOT / d).exists()]
