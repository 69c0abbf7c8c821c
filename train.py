"""Train a SoftSRV embedding P_θ on a target sample (paper Sec. 2 and 3.3, step 1).

    python train.py                              # SS_MC on GSM8K questions, offline default model
    python train.py --param np --out out/ss_np   # the non-contextual baseline
    python train.py --preset paper               # the paper's settings (TPU-scale: days on a CPU)
    torchrun --nproc_per_node=2 train.py ...     # data-parallel over θ (docs/distributed.md)

Loop: z_i = E(x_i) is computed once and cached; each step draws a batch, builds P_θ(z_i), and
minimizes the causal cross-entropy of x_i given P_θ(z_i) as the only prefix of the frozen H.
"""
from __future__ import annotations

import argparse

import data
import options
from dist import cli_errors
from runtime import DTYPES, keep_freed_memory
from softsrv import PRESETS, TrainConfig, train, train_config
from weights import DEFAULT_MODEL


def parse_args(argv=None) -> tuple[TrainConfig, bool]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--preset", choices=PRESETS, default="cpu",
      help="defaults for t, steps, batch size, lr, max tokens: 'cpu' (default, ~10 minutes on 2 cores) "
           "or 'paper' (Sec. 3.3: t=128, 20K steps, lr 5e-6). Options given explicitly override it.")
    a("--param", choices=["np", "mp", "mc"], default="mc",
      help="parameterization: np = one prompt (Eq. 1), mp = mixture of k prompts (Eq. 2), "
           "mc = t MLPs of the context (Eq. 3). Default: mc")
    a("--k", type=options.count, default=2, help="MPk: number of basis prompts (default 2)")
    a("--prompt-len", type=options.count, help="t, the number of soft tokens (cpu 16, paper 128)")
    a("--hidden", type=options.count, default=128, help="MC: hidden width of each 3-layer MLP (default 128)")
    a("--steps", type=options.count, help="optimizer steps (cpu 250, paper 20000)")
    a("--lr", type=options.positive, help="peak AdamW learning rate (cpu: np/mp 2.4e-2, mc 3e-3; paper 5e-6)")
    a("--warmup", type=options.count0, help="linear warm-up steps before the cosine decay (cpu 10, paper 0)")
    a("--batch-size", type=options.count, help="examples per step (cpu 8, paper 16)")
    a("--mp-decay", type=options.nonneg,
      help="SS_MP: AdamW weight decay on the bases' deviations from their mean, pulling the k bases together "
           "unless the data keeps them apart (cpu 3.0, best of 0/1/3 on seed 0; paper 0 = Eq. 2 as published)")
    a("--max-tokens", type=options.count, help="cut each example to this many tokens (cpu 128, paper 512)")
    a("--data", default="gsm8k", type=options.data_source(data.DATASETS),
      help=f"registered dataset ({', '.join(data.DATASETS)}) or a .jsonl/.json/.txt file (recorded as an "
           "absolute path). Default: gsm8k (offline: the part of the GSM8K test fold set aside as a stand-in "
           "train fold, see data.py)")
    a("--field", help="text field of a .jsonl/.json file (dotted paths allowed; default 'text')")
    a("--split", default="train", help="split of a registered dataset (default train)")
    a("--n-heldout", type=options.count, default=100,
      help="examples kept out of training to measure held-out reconstruction loss (default 100)")
    a("--model", default=DEFAULT_MODEL, type=options.model,
      help=f"frozen backbone H: model folder, .gguf file, hub id, or the offline default (default {DEFAULT_MODEL})")
    a("--embed-model", default=None, type=options.model, help="context encoder E's model (default: the same as --model)")
    a("--out", help="checkpoint folder (default out/ss_<param>)")
    a("--seed", type=options.seed, default=0, help="seed for initialization and batch order (default 0)")
    a("--eval-every", type=options.count, help="steps between held-out evaluations and checkpoints (cpu 50, paper 1000)")
    a("--dtype", choices=DTYPES, default="auto",
      help="backbone precision (default auto: bf16 where this machine runs it faster than fp32, measured "
           "at start-up; θ stays fp32)")
    a("--resume", action="store_true", help="continue the run saved in --out up to --steps")
    args = p.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k not in ("preset", "param", "resume")}
    given["out"] = args.out or f"out/ss_{args.param}"
    return train_config(args.param, args.preset, **given), args.resume


def main(argv=None):
    cfg, resume = parse_args(argv)
    with cli_errors():
        train(cfg, resume=resume)


if __name__ == "__main__":
    keep_freed_memory()   # before the first big allocation (model.py says why)
    main()
