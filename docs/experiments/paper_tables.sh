#!/usr/bin/env bash
# Tables 1-2 analog at CPU scale (issue 26 §3, SPEC §11): students fine-tuned on arms that differ only
# in their questions. Every arm: N pairs, the same k-shot answer prompt (--answer-format fewshot) and
# gates, the same fine-tuning steps, lr and seeds; the control (--method train) first.
#   bash docs/experiments/paper_tables.sh      # LR, STEPS from control_sweep.sh (RUNS/sweep/choice.env) or given
#   ARMS="train mc pt" ... to run a subset; re-running resumes every run folder where it stopped.
# Then: python docs/experiments/paper_tables.py --runs runs/tables > results/paper_tables.md
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
RUNS=${RUNS:-runs/tables}
TASK=${TASK:-gsm8k}
N=${N:-200}            # pairs per arm (the paper: 50K; cut first, before seeds and arms)
G=${G:-500}            # questions generated per arm (the paper: 2x N)
if [ -z "${LR:-}${STEPS:-}" ] && [ -f "$RUNS/sweep/choice.env" ]; then . "$RUNS/sweep/choice.env"; fi
LR=${LR:?set LR (or run docs/experiments/control_sweep.sh, which writes RUNS/sweep/choice.env)}
STEPS=${STEPS:?set STEPS (or run docs/experiments/control_sweep.sh)}
DTYPE=${DTYPE:-auto}   # matmul precision of every step
SEEDS=${SEEDS:-"0 1"}  # fine-tuning seeds (packing and batch order); seed 0 is the pipeline's own run
LIMIT=${LIMIT:-100}    # held-out items for the k-shot and 0-shot chat metrics
LOSS_LIMIT=${LOSS_LIMIT:-}  # held-out items of the answer loss (default all; BoolQ's dev fold has 3,270)
LOSS=(); [ -n "$LOSS_LIMIT" ] && LOSS=(--loss-limit "$LOSS_LIMIT")
# EOS allowed as the answer's first token (0) or not (1, the pipeline's default). The committed GSM8K
# arms (mc, pt, train, pt_matched) ran with 0, so arms added to those tables must too.
ANSWER_MIN_TOKENS=${ANSWER_MIN_TOKENS:-0}
ARMS=${ARMS:-"train mc pt np mc_full pt_sr mp pt_matched mc_asis pt_asis"}   # in order of what the claims need first
COMMON=(--task "$TASK" --n-keep "$N" --n-generate "$G" --dtype "$DTYPE" --ft-lr "$LR" --ft-steps "$STEPS"
        --ft-checkpoints 1 --eval-limit "$LIMIT" ${LOSS_LIMIT:+--eval-loss-limit "$LOSS_LIMIT"}
        --answer-min-tokens "$ANSWER_MIN_TOKENS")
mkdir -p "$RUNS"

# The student before fine-tuning is the same model in every arm: evaluated once, with the settings
# the pipeline's evaluation uses, and handed to each run folder as its step 0.
BASE=$RUNS/$TASK-base.json
[ -f "$BASE" ] || $PY eval.py task "$TASK" --limit "$LIMIT" "${LOSS[@]}" --dtype "$DTYPE" --out "$BASE"

arm() {   # arm NAME PIPELINE-OPTIONS...
  local name=$1; shift
  local out=$RUNS/$TASK-$name
  mkdir -p "$out/eval"
  [ -f "$out/eval/step-0.json" ] || cp "$BASE" "$out/eval/step-0.json"
  echo "== $name: $PY pipeline.py ${COMMON[*]} $* --out $out"
  $PY pipeline.py "${COMMON[@]}" "$@" --out "$out"
  for s in $SEEDS; do
    [ "$s" = 0 ] && continue
    local ft=$out/finetune-s$s
    $PY finetune.py --data "$out/data.jsonl" --out "$ft" --lr "$LR" --steps "$STEPS" --n-checkpoints 1 \
        --seed "$s" --dtype "$DTYPE"
    [ -f "$ft/eval.json" ] || $PY eval.py task "$TASK" --model "$ft/step-$STEPS" --limit "$LIMIT" "${LOSS[@]}" \
        --dtype "$DTYPE" --out "$ft/eval.json"
  done
}

share() {  # share FROM TO FILES...: an arm that differs from another only after a step reuses its files
  local from=$RUNS/$TASK-$1 to=$RUNS/$TASK-$2; shift 2
  mkdir -p "$to"
  for f in "$@"; do
    [ -e "$to/$f" ] || cp -r "$from/$f" "$to/$f"
  done
}

for a in $ARMS; do
  case $a in
    train)   arm train --method train ;;
    mc|np|mp) arm "$a" --method "$a" --answer-format fewshot ;;
    pt) arm pt --method pt --answer-format fewshot ;;
    # PT_SR refines PT's questions one for one, so it has PT's low yield: run at pt_matched's counts
    pt_sr) arm pt_sr --method pt_sr --answer-format fewshot --n-generate $((G * 16 / 5)) --answer-attempts 4 ;;
    mc_full) arm mc_full --method mc --target full ;;
    mc_asis) share mc mc_asis softsrv generated.jsonl; arm mc_asis --method mc --answer-format as-is ;;
    pt_asis) share pt pt_asis pt_completions.jsonl; arm pt_asis --method pt --answer-format as-is ;;
    # PT at the pairs of the other arms: PT's completions hold fewer and less answerable questions, so
    # it takes about 3x the completions (160 at G=500) and answer attempts to reach N usable pairs
    pt_matched) share pt pt_matched pt_completions.jsonl
                arm pt_matched --method pt --answer-format fewshot --n-generate $((G * 16 / 5)) --answer-attempts 4 ;;
    *) echo "unknown arm $a" >&2; exit 2 ;;
  esac
done
