"""The paper's Tables 1-2 and 4-5 at CPU scale from the run folders of paper_tables.sh (issue 26 §3).

    python docs/experiments/paper_tables.py --runs runs/tables --task gsm8k > results/paper_tables_gsm8k.md

Downstream (Tables 1-2 analog): per arm, the student's k-shot pass@1 (the paper's metric), its 0-shot
chat-format pass@1 and its held-out answer loss, averaged over the fine-tuning seeds; then paired
bootstrap intervals over the held-out items (stats.compare_evals, seeds pooled) for the comparisons
the paper's claims rest on. An interval that contains 0 is a tie: the items cannot tell the arms apart.

Questions (Tables 4-5 analog): MAUVE of each arm's trained questions (data.jsonl) against the held-out
test questions and against the train fold, the same number of questions for every arm, k-means seeds
1-5 (mean and range; features from E once per text set).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import data  # noqa: E402
import stats  # noqa: E402

LABELS = {"base": "student before fine-tuning", "train": "train (control: real questions, reference answers)",
          "np": "SS_NP", "mp": "SS_MP2", "mc": "SS_MC", "pt": "PT", "pt_sr": "PT_SR (at pt_matched's counts)",
          "mc_full": "SS_MC on whole examples (--target full)", "mc_asis": "SS_MC, as-is answers",
          "pt_asis": "PT, as-is answers (Fig. 9)", "pt_matched": "PT at matched N (3x completions and attempts)"}
# (A, B, what the paper says): the orderings its claims rest on
COMPARISONS = [("train", "base", "fine-tuning on real pairs helps (the control must)"),
               ("mc", "base", "fine-tuning on SoftSRV's pairs helps"),
               ("np", "base", "fine-tuning on SS_NP's pairs helps"),
               ("mp", "base", "fine-tuning on SS_MP2's pairs helps"),
               ("mc_full", "base", "fine-tuning on SS_MC's whole examples helps"),
               ("pt", "base", "fine-tuning on PT's pairs helps"),
               ("pt_sr", "base", "fine-tuning on PT_SR's pairs helps"),
               ("pt_matched", "base", "fine-tuning on PT's pairs helps, pairs matched"),
               ("mc", "pt", "SoftSRV beats prompt templates (Tables 1-2)"),
               ("mc", "pt_matched", "SoftSRV beats prompt templates, pairs matched (Tables 1-2)"),
               ("mc", "pt_sr", "SoftSRV beats PT with self-refinement (Tables 1-2)"),
               ("mc", "np", "contextual beats non-contextual (MC > NP)"),
               ("mp", "np", "contextual beats non-contextual (MP2 > NP)"),
               ("mc", "mp", "MC >= MP2"),
               ("mc", "train", "SoftSRV vs the real data (Table 3: MC beats train when mixed)"),
               ("mc_full", "mc", "(beyond the paper) whole examples vs answered questions"),
               ("mc_full", "train", "(beyond the paper) whole examples vs the real data"),
               ("mc", "mc_asis", "(design) the same k-shot answer prompt vs the question as-is"),
               ("pt", "pt_asis", "(design) the same k-shot answer prompt vs Fig. 9")]


# the task metric (the paper's) and its 0-shot chat-format twin, per task (tasks.evaluate_task)
METRICS = {"gsm8k": ("k-shot pass@1", "0-shot chat pass@1"), "mbpp": ("k-shot pass@1", "0-shot chat pass@1"),
           "boolq": ("accuracy (plain yes/no)", "chat accuracy (P(True) vs P(False))")}


def arm_evals(runs: Path, task: str, arm: str) -> list[Path]:
    """One eval.py output per fine-tuning seed of an arm (seed 0: the pipeline's own run)."""
    if arm == "base":
        p = runs / f"{task}-base.json"
        return [p] if p.exists() else []
    out = runs / f"{task}-{arm}"
    found = sorted((out / "eval").glob("step-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    found = [p for p in found if p.stem != "step-0"][-1:]
    # the other seeds: finetune-sN/eval.json in a run folder, eval/seedN-step-K.json as kept in results/tables
    return found + sorted(out.glob("finetune-s*/eval.json")) + sorted((out / "eval").glob("seed*-step-*.json"))


def fmt(x, spec=".4f"):
    return "–" if x is None else format(x, spec)


def downstream(runs: Path, task: str) -> list[str]:
    arms = [a for a in LABELS if arm_evals(runs, task, a)]
    plain, chat = METRICS.get(task, METRICS["gsm8k"])
    boolq = task == "boolq"            # a label prior alone moves accuracy: the majority label beside it
    lines = ["## Downstream (Tables 1-2 analog)", "",
             f"| arm | pairs | answers dropped | seeds | {plain} | {chat} | "
             + ("predicted true (plain / chat) | " if boolq else "")
             + "held-out answer loss (per seed) |", "|---|---|---|---|---|---|" + ("---|" if boolq else "") + "---|"]
    for a in arms:
        evals = [json.loads(p.read_text())["summary"] for p in arm_evals(runs, task, a)]
        mean = lambda k: None if any(e.get(k) is None for e in evals) else sum(e[k] for e in evals) / len(evals)
        st = json.loads((runs / f"{task}-{a}" / "state.json").read_text()) if a != "base" else {}
        pairs = st.get("decontam", {}).get("kept", "–")
        dropped = st.get("answer", {}).get("dropped")
        dropped = "–" if dropped is None else (", ".join(f"{k} {v}" for k, v in dropped.items()) or "0")
        losses = " / ".join(f"{e['answer_loss']:.4f}" for e in evals)
        shares = f"{fmt(mean('true_share'), '.2f')} / {fmt(mean('chat_true_share'), '.2f')} | " if boolq else ""
        lines.append(f"| {LABELS[a]} | {pairs} | {dropped} | {len(evals)} | {fmt(mean('score'), '.3f')} "
                     f"(n={evals[0]['n']}) | {fmt(mean('chat_score'), '.3f')} | {shares}{fmt(mean('answer_loss'))} "
                     f"({losses}; n={evals[0].get('answer_n', evals[0]['n'])}) |")
    if boolq and arms:
        e = json.loads(arm_evals(runs, task, arms[0])[0].read_text())["summary"]
        if "majority_accuracy" in e:
            lines += ["", f"Always answering the majority label ({e['majority_label']!r}) of these {e['n']} items "
                      f"scores {e['majority_accuracy']:.3f}: an accuracy near it can be a prior shift alone."]
    lines += ["", "## Paired comparisons (95% bootstrap over held-out items, fine-tuning seeds pooled)", "",
              f"| A vs B | claim | Δ {plain} [95%] | Δ {chat} [95%] | Δ answer loss [95%] (lower is "
              "better) | verdicts (plain, chat, loss) |", "|---|---|---|---|---|---|"]
    for a, b, claim in COMPARISONS:
        pa, pb = arm_evals(runs, task, a), arm_evals(runs, task, b)
        if not pa or not pb:
            continue
        c = stats.compare_evals(pa, pb)
        cell = lambda k: "–" if k not in c else f"{c[k]['diff']:+.4f} [{c[k]['lo']:+.4f}, {c[k]['hi']:+.4f}]"
        verdicts = ", ".join(c[k]["verdict"].replace("A", a).replace("B", b) if k in c else "–"
                             for k in ("score", "chat_score", "answer_loss"))
        lines.append(f"| {a} vs {b} | {claim} | {cell('score')} | {cell('chat_score')} | {cell('answer_loss')} "
                     f"| {verdicts} |")
    return lines


def mauve_table(runs: Path, task: str, seeds=(1, 2, 3, 4, 5), buckets: int = 32, min_n: int = 100,
                max_ref: int = 1000, n: int | None = None) -> list[str]:
    import mauve
    from tasks import TASKS as EVAL_TASKS
    arms = [a for a in LABELS if a != "base" and (runs / f"{task}-{a}" / "data.jsonl").exists()]
    questions = {a: [r["question"] for r in data.read_jsonl(runs / f"{task}-{a}" / "data.jsonl")] for a in arms}
    short = [a for a in arms if len(questions[a]) < (n or min_n)]   # MAUVE at every arm's N: the smallest sets it
    arms = [a for a in arms if a not in short]
    if not arms:
        return []
    n = n or min(len(questions[a]) for a in arms)
    # the first max_ref texts of each side (BoolQ's folds hold 3,270 and 9,427 passages)
    refs = {"test": [e.text for e in data.load_examples(task, EVAL_TASKS[task][0])][:max_ref],
            "train": [e.text for e in data.load_examples(task, "train")][:max_ref]}
    feats = {k: mauve.featurize(v, dtype="fp32", progress=False) for k, v in refs.items()}
    lines = ["## Questions: MAUVE (Tables 4-5 analog)", "",
             f"{n} questions per arm (the first {n} of each data.jsonl) against {len(refs['test'])} held-out "
             f"test questions and {len(refs['train'])} train-fold questions (the first {max_ref} at most); {buckets} buckets; k-means seeds "
             f"{seeds[0]}-{seeds[-1]}: mean (min-max)."
             + (f" Left out, fewer than {min_n} questions: {', '.join(f'{LABELS[a]} ({len(questions[a])})' for a in short)}."
                if short else ""), "",
             "| arm | MAUVE vs test | MAUVE vs train |", "|---|---|---|"]
    for a in arms:
        p = mauve.featurize(questions[a][:n], dtype="fp32", progress=False)
        cells = []
        for ref in ("test", "train"):
            vals = [mauve.compute_mauve(p, feats[ref], num_buckets=buckets, seed=s).mauve for s in seeds]
            cells.append(f"{sum(vals) / len(vals):.3f} ({min(vals):.3f}-{max(vals):.3f})")
        lines.append(f"| {LABELS[a]} | {cells[0]} | {cells[1]} |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/tables", help="paper_tables.sh's RUNS folder (default runs/tables)")
    p.add_argument("--task", default="gsm8k", help="the task whose arms to read (default gsm8k)")
    p.add_argument("--no-mauve", action="store_true", help="skip the MAUVE table (it featurizes every arm)")
    p.add_argument("--mauve-n", type=int, default=None,
                   help="questions per arm for MAUVE (default: the smallest arm's count, arms under 100 left out); "
                        "give it to add an arm to a table built at that N")
    args = p.parse_args(argv)
    runs = Path(args.runs)
    lines = [f"# {args.task}: the paper's tables at CPU scale", "",
             f"Built by `python docs/experiments/paper_tables.py --runs {args.runs} --task {args.task}` from the "
             f"run folders of `docs/experiments/paper_tables.sh`.", ""]
    lines += downstream(runs, args.task)
    if not args.no_mauve:
        lines += [""] + mauve_table(runs, args.task, n=args.mauve_n)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
