"""How good is a model on the target tasks (paper Sec. 3.3, step 6): task metrics and the held-out answer loss.

    python eval.py task gsm8k --model smollm2-135m-instruct            # 5-shot pass@1 on the 330 held out
    python eval.py task boolq --model out/ft_mc --limit 1000           # a fine-tuned HF folder
    torchrun --nproc_per_node=2 eval.py task gsm8k                     # 2 processes share the items, same file
    python stats.py -a out/eval/gsm8k-a.json -b out/eval/gsm8k-b.json  # paired bootstrap of two runs
    python eval.py mauve --gen out/ss_mc/samples.jsonl --ref gsm8k:test  # see mauve.py

Every `task` run reports on the same held-out items:
- the task metric: GSM8K pass@1 (5-shot, final number), MBPP pass@1 (3-shot, sandboxed tests), BoolQ
  accuracy (log-likelihood of " yes" vs " no"), TriviaQA exact match (0-shot, any alias), HumanEval pass@1;
- the same metric 0-shot in the student's own chat format (docs/experiments/README.md; "chat_score"): the question as the
  user turn (`qa_prompt_ids`), the assistant's greedy answer scored as above (GSM8K, MBPP), BoolQ from
  the probabilities of True vs False as the answer's first token; for BoolQ also the majority label's
  accuracy and the share of items each scoring calls true, so a shift of the label prior is visible;
- the held-out answer loss: mean per-token cross-entropy of the reference answer given the question in
  the one question->answer format (`qa_prompt_ids` / `qa_answer_ids`) that fine-tuning trains on, on
  ALL held-out items unless --loss-limit says otherwise (per-item values kept for stats.py's paired
  bootstrap). At 135M parameters pass@1 barely moves between data sets; this continuous figure does.
Few-shot examples come from the train fold (offline: data.py's stand-in part), never from evaluated items.
The benchmarks themselves (prompts, runners, scoring, the answer loss) are in tasks.py.
"""
from __future__ import annotations

import argparse
import json
import sys

import mauve
import options
from dist import cli_errors, init_distributed
from runtime import DTYPES, keep_freed_memory
from tasks import TASKS, evaluate_task
from weights import DEFAULT_MODEL


# ----------------------------------------------------------------------------------------------
# CLI

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["mauve"]:  # MAUVE has its own options (mauve.py); pass them through untouched
        return mauve.cli(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("mauve", help="MAUVE of generated vs reference texts (options: eval.py mauve --help)")
    t = sub.add_parser("task", help="task metric + held-out answer loss of a model",
                       description="Task metric and held-out answer loss of a model; writes JSON.")
    t.add_argument("task", choices=list(TASKS), help="the benchmark")
    t.add_argument("--model", default=DEFAULT_MODEL, type=options.model, help="any name load_model takes: the offline default, "
                   f"a HF folder (e.g. a fine-tuned one), a .gguf, a hub id (default {DEFAULT_MODEL})")
    t.add_argument("--limit", type=options.count, help="run the task metrics (k-shot and chat) on only the first N held-out "
                   "items (default: all; the answer loss follows --loss-limit)")
    t.add_argument("--shots", type=options.count0, help="few-shot examples from the train fold (default: gsm8k 5, "
                   "mbpp 3, boolq 0; triviaqa and humaneval are 0-shot only)")
    t.add_argument("--batch-size", type=options.count, default=8, help="prompts per forward/decode batch (default 8)")
    t.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="model precision (default auto: bf16 where measured faster than fp32 here)")
    t.add_argument("--out", help="output JSON (default out/eval/<task>-<model>.json)")
    t.add_argument("--loss-only", action="store_true", help="only the held-out answer loss, no task metric "
                   "(score null; default: both)")
    t.add_argument("--loss-limit", type=int, help="held-out items the answer loss runs on, independent of "
                   "--limit (default: all; per-item losses go to the output's answer_losses for stats.py)")
    t.add_argument("--no-chat", dest="chat", action="store_false", help="skip the 0-shot chat-format metric "
                   "(gsm8k, mbpp pass@1; boolq accuracy from True/False probabilities; default: run it)")
    args = p.parse_args(argv)
    with cli_errors():      # under torchrun the ranks share the items; rank 0 writes
        rank, world, _ = init_distributed()
        summary = evaluate_task(args.task, args.model, args.limit, args.shots, args.batch_size, args.out,
                                args.dtype, args.loss_only, args.loss_limit, args.chat, rank, world)
    if rank == 0:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    keep_freed_memory()   # before the first big allocation (model.py says why)
    main()
