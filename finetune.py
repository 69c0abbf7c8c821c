"""Fine-tune a student LM on (question, answer) pairs (paper Sec. 3.3, step 5); the method is student.py.

    python finetune.py --data runs/gsm8k-mc/data.jsonl --out runs/gsm8k-mc/finetune

Each pair is the question in the student's chat format followed by the answer and its end-of-turn
token; the loss counts answer tokens only; pairs are packed into rows of --seq-len tokens. At each
step of --save-at the model is written as a Hugging Face-layout folder `<out>/step-N` (load_model and
transformers read it back); re-running the same command resumes from the newest complete `step-N`.
"""
from __future__ import annotations

import argparse
import sys

import options
from runtime import DTYPES, keep_freed_memory
from student import PRESETS, FinetuneConfig, finetune, finetune_config
from weights import DEFAULT_MODEL


def parse_args(argv=None) -> FinetuneConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data", required=True, type=options.path,
      help="JSONL of pairs with 'question' and 'answer' fields (pipeline.py's data.jsonl); every line must be "
           "a complete record")
    a("--out", default="out/finetune", help="folder for the step-N checkpoints (default out/finetune)")
    a("--model", default=DEFAULT_MODEL, type=options.model, help=f"student to fine-tune: any model load_model takes (default {DEFAULT_MODEL})")
    a("--preset", choices=PRESETS, default="cpu",
      help="defaults for the options below: tiny (a smoke run), cpu (default), paper (Sec. 3.3)")
    a("--seq-len", type=options.count, help="tokens per packed row (tiny 256, cpu 1024, paper 8192)")
    a("--batch-size", type=options.count, help="packed rows per optimizer step (tiny 2, cpu 8, paper 16)")
    a("--micro-batch", type=options.count, default=2, help="rows per forward/backward pass; gradients accumulate (default 2)")
    a("--lr", type=options.positive, help="peak learning rate (tiny 1e-4, cpu 2e-5, paper 1e-6)")
    a("--warmup", type=options.count0, help="linear warm-up steps from 0 (tiny 1, cpu 5, paper 100)")
    a("--epochs", type=options.positive, help="passes over the pairs (default 1)")
    a("--steps", type=options.count0, default=0, help="exactly this many optimizer steps, cycling over the pairs; "
      "overrides --epochs (default 0 = from --epochs); comparisons between data sets fix it")
    a("--weight-decay", type=options.nonneg, default=0.0, help="AdamW weight decay (default 0)")
    a("--save-at", type=options.count, nargs="*", default=[],
      help="checkpoint steps (default: --n-checkpoints evenly spaced; the last step always)")
    a("--n-checkpoints", type=options.count, help="evenly spaced checkpoints when --save-at is not given (tiny 2, cpu 3, paper 5)")
    a("--seed", type=options.seed, default=0, help="seed for packing and batch order (default 0)")
    a("--dtype", choices=DTYPES, default="auto",
      help="matmul precision (default auto: bf16 autocast where measured faster than fp32 here; weights "
           "and optimizer state stay fp32)")
    args = p.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k not in ("preset", "steps")}
    return finetune_config(args.preset, fixed_steps=args.steps, **given)


def main(argv=None):
    cfg = parse_args(argv)
    try:
        finetune(cfg)
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    keep_freed_memory()   # before the first big allocation (model.py says why)
    main()
