#!/usr/bin/env bash
# Issue 26 §2: the fine-tuning lr and length of the `cpu` preset, chosen on the control arm alone
# (N real GSM8K train questions with their reference answers) as the setting under which the student's
# held-out answer loss falls most; every arm of the tables then uses it.
#   bash docs/experiments/control_sweep.sh            # resumes: every step skips what is already written
# The setting with the lowest held-out answer loss (lr, and the checkpoint's step as STEPS) is written to
# $RUNS/sweep/choice.env, which paper_tables.sh reads when LR and STEPS are not given.
# Each fine-tuning runs STEPS steps (a cosine schedule over all of them) with checkpoints at each third,
# i.e. after ~1, 2 and 3 passes over the N pairs; each checkpoint's answer loss is measured on all 330
# held-out GSM8K items (eval.py --loss-only).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
RUNS=${RUNS:-runs/tables}
N=${N:-200}
STEPS=${STEPS:-12}
DTYPE=${DTYPE:-auto}   # matmul precision of every step (bf16 autocast where the CPU has bf16 units)
CTRL=$RUNS/sweep/control     # its own folder: the train arm of paper_tables.sh has other fine-tuning settings
$PY pipeline.py --task gsm8k --method train --n-keep "$N" --dtype "$DTYPE" --out "$CTRL" --stop-after decontam
mkdir -p "$RUNS/sweep"
[ -f "$RUNS/sweep/base.json" ] || $PY eval.py task gsm8k --loss-only --dtype "$DTYPE" --out "$RUNS/sweep/base.json"
for LR in 2e-5 5e-5 1e-4; do
  FT=$RUNS/sweep/ft-lr$LR
  $PY finetune.py --data "$CTRL/data.jsonl" --out "$FT" --lr "$LR" --steps "$STEPS" --n-checkpoints 3 --seed 0 --dtype "$DTYPE"
  for CK in "$FT"/step-*; do
    [ -f "$CK.eval.json" ] || $PY eval.py task gsm8k --model "$CK" --loss-only --dtype "$DTYPE" --out "$CK.eval.json"
  done
done
$PY - "$RUNS/sweep" <<'PY'
import json, sys, pathlib
root = pathlib.Path(sys.argv[1])
base = json.loads((root / "base.json").read_text())["summary"]["answer_loss"]
print(f"student before fine-tuning: held-out answer loss {base:.4f}")
for ft in sorted(root.glob("ft-lr*")):
    row = [f"{json.loads(p.read_text())['summary']['answer_loss']:.4f} (step {p.name.split('.')[0].split('-')[1]})"
           for p in sorted(ft.glob("step-*.eval.json"), key=lambda p: int(p.name.split(".")[0].split("-")[1]))]
    print(ft.name, " ".join(row))
best = None
for p in root.glob("ft-lr*/step-*.eval.json"):
    loss = json.loads(p.read_text())["summary"]["answer_loss"]
    lr, step = p.parent.name[len("ft-lr"):], int(p.name.split(".")[0].split("-")[1])
    if best is None or loss < best[0]:
        best = (loss, lr, step)
print(f"lowest held-out answer loss {best[0]:.4f}: lr {best[1]}, step {best[2]} (before fine-tuning: {base:.4f})")
(root / "choice.env").write_text(f"LR={best[1]}\nSTEPS={best[2]}\n")
PY
