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
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

import data
import options
from dist import append_in_rounds, cli_errors, init_distributed, rank0_first
from runtime import DTYPES, dtype_of, keep_freed_memory
from sampling import sample
from softsrv import (ContextEncoder, TrainConfig, context_vectors, load_checkpoint, load_training_data, prepend_bos,
                     theta_hash)
from weights import load_model, load_tokenizer


def generate(ckpt: str, n: int, out: str | None = None, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 0, batch_size: int = 16, max_new_tokens: int | None = None, seed: int = 0,
             dtype: str | None = None) -> Path:
    prompt, record = load_checkpoint(ckpt)
    cfg = TrainConfig(**record["config"])
    out_path = Path(out) if out else Path(ckpt) / "samples.jsonl"
    max_new_tokens = cfg.max_tokens if max_new_tokens is None else max_new_tokens
    rank, world, device = init_distributed()
    # The file belongs to one process (rank 0 of one torchrun job) at a time: two appending at once
    # would write every sample twice. Rank 0's refusal reaches the other ranks as the same line.
    with rank0_first(rank, world):
        held = data.lock(out_path.parent / f".{out_path.name}.lock", str(out_path)) if rank == 0 else nullcontext()
    with held:
        # Which weights and settings wrote each sample: an existing file is continued only by the same
        # θ (its hash, so a retrained or other checkpoint at the same path is caught) and settings.
        settings = {"checkpoint": str(Path(ckpt).resolve()), "theta": theta_hash(ckpt), "step": record["step"],
                    "temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed,
                    "batch_size": batch_size, "max_new_tokens": max_new_tokens}
        done = set()
        if out_path.exists():
            for r in data.read_jsonl(out_path, repair=True):
                other = [f"{k}: {r.get(k)!r} -> {v!r}" for k, v in settings.items()
                         if k != "checkpoint" and r.get(k) != v]
                if other:
                    raise ValueError(f"{out_path}: holds samples from another checkpoint or with other settings "
                                     f"(sample {r.get('index')}, {r.get('checkpoint')}: {'; '.join(other)}); "
                                     f"choose another --out or delete it")
                done.add(r["index"])
        todo = [b for b in range(0, n, batch_size) if any(i not in done for i in range(b, min(n, b + batch_size)))]
        if not todo:
            if rank == 0:
                print(f"{out_path}: all {n} samples already there")
            return out_path

        train_ex, held_ex = load_training_data(cfg)
        if data.fingerprint(train_ex) != record["data_fingerprint"]:
            raise ValueError(f"--data {cfg.data}: not the data {ckpt} was trained on (fingerprint changed)")
        with rank0_first(rank, world):     # a first run converts the model and embeds the data once
            backbone = load_model(cfg.model, dtype=dtype_of(dtype or cfg.dtype, device), device=device)
            tok = load_tokenizer(cfg.model)
            enc_model = backbone if cfg.embed_model == cfg.model else load_model(cfg.embed_model, dtype=backbone.dtype, device=device)
            encoder = ContextEncoder(enc_model, tok if enc_model is backbone else load_tokenizer(cfg.embed_model))
            all_ex = train_ex + held_ex    # the same list train.py embedded, so the cached z is reused
            z = context_vectors(encoder, cfg.embed_model, [e.text for e in all_ex], data.fingerprint(all_ex))[: len(train_ex)]
        prompt = prompt.to(device).eval()

        def batch_records(b: int) -> list[dict]:
            idx = list(range(b, min(n, b + batch_size)))
            ctx = [i % len(train_ex) for i in idx]                        # round-robin over the train fold
            g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + b // batch_size)
            with torch.no_grad():
                prefix = prepend_bos(backbone, tok, prompt(z[ctx].to(device)))   # as train.py trained it
                rows = sample(backbone, prefix, max_new_tokens, temperature=temperature,
                              top_k=top_k, top_p=top_p, eos_id=tok.eos_id, generator=g)
            return [{"text": tok.decode(ids).strip(), "index": i, "context_id": train_ex[c].id,
                     "context_text": train_ex[c].text,
                     "method": record["method"], "n_tokens": len(ids), "finished": len(ids) < max_new_tokens,
                     **settings} for i, c, ids in zip(idx, ctx, rows) if i not in done]

        bar = tqdm(total=n, initial=len(done), desc=f"{record['method']} samples", unit="sample", disable=rank != 0)
        append_in_rounds(out_path, todo, batch_records, rank, world, on_write=bar.update)
        bar.close()
        if rank == 0:
            print(f"wrote {out_path}")
        return out_path


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
