"""Generate synthetic examples from a trained SoftSRV checkpoint (paper Sec. 3.3, step 2).

    python generate.py --ckpt out/ss_mc --n 1000

Sample i uses the training example (i mod n_train) as its context: z = E(x), x' ~ H(P_θ(z)),
round-robin over the train fold as in Appendix A.2 (SS_NP ignores the context). No text prompt of
any kind goes into H. Output is JSONL, one sample a line, each recording the checkpoint (path, θ's
hash, step) and settings that wrote it; re-running the same command after an interruption appends
only the missing samples (batch b is always drawn with seed (seed, b)), and a file written from
another checkpoint or with other settings is refused. One process writes a file at a time (a lock
beside it; a second one is refused with a line naming the holder).

    torchrun --nproc_per_node=2 generate.py --ckpt out/ss_mc --num-samples 1000

Under torchrun each rank decodes its own share of the missing batches; rank 0 gathers every round
and writes the one JSONL in batch order, the same file a single process writes.
"""
from __future__ import annotations

import argparse

import options
from dist import cli_errors
from runtime import DTYPES, keep_freed_memory
from softsrv import generate


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--ckpt", default="out/ss_mc", help="checkpoint folder written by train.py (default out/ss_mc)")
    a("--n", "--num-samples", dest="n", type=options.count, default=100,
      help="number of samples to generate (default 100); under torchrun spell it --num-samples, "
           "since torchrun's own parser takes --n for one of its options")
    a("--out", help="output JSONL (default <ckpt>/samples.jsonl); an existing file is completed, not redone, "
                    "if the same checkpoint and settings wrote it (otherwise refused)")
    a("--temperature", type=options.temperature, default=1.0,
      help="sampling temperature; the paper uses 1 for SoftSRV; 0 = greedy (default 1.0)")
    a("--top-p", type=options.top_p, default=1.0,
      help="nucleus sampling: keep the smallest token set with this mass, in (0, 1] (default 1.0 = off)")
    a("--top-k", type=options.count0, default=0, help="keep only the k most likely tokens (default 0 = off)")
    a("--batch-size", type=options.count, default=16, help="samples decoded together (default 16)")
    a("--max-new-tokens", type=options.count, help="longest sample in tokens (default: the checkpoint's --max-tokens)")
    a("--seed", type=options.seed, default=0, help="sampling seed; batch b uses (seed, b) (default 0)")
    a("--dtype", choices=DTYPES, help="backbone precision (default: as trained)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with cli_errors():
        generate(args.ckpt, args.n, args.out, args.temperature, args.top_p, args.top_k, args.batch_size,
                 args.max_new_tokens, args.seed, args.dtype)


if __name__ == "__main__":
    keep_freed_memory()   # before the first big allocation (model.py says why)
    main()
