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
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import options
from dist import all_sum, cli_errors, init_distributed, rank0_first
from runtime import DTYPES, dtype_of, keep_freed_memory
from sampling import sample
from softsrv import (CKPT_CONFIG, PRESETS, ContextEncoder, TrainConfig, build_soft_prompt, context_vectors,
                     load_checkpoint, load_optimizer_state, load_training_data, lr_at, pad_targets, prepend_bos,
                     save_checkpoint, softsrv_loss)
from weights import DEFAULT_MODEL, load_model, load_tokenizer



def make_optimizer(prompt, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (= Adam where the decay is 0: everything but SS_MP's deviations D)."""
    return torch.optim.AdamW(prompt.param_groups(cfg.mp_decay), lr=cfg.lr)


def batch_indices(cfg: TrainConfig, step: int, lengths: list[int]) -> list[int]:
    """Step -> example indices. Each epoch is a random permutation cut into pools of 32 batches;
    a pool is sorted by length before it is cut into batches (so a batch pads little: about a
    third less compute on GSM8K), and the batches are shuffled. Everything is drawn from
    (seed, epoch) alone, so a resumed run sees exactly the batches an uninterrupted one would."""
    B, n = cfg.batch_size, len(lengths)
    epoch, i = divmod(step, n // B)                     # the last n mod B examples wait a turn
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()[: n // B * B]
    batches = []
    for s in range(0, len(perm), 32 * B):
        pool = sorted(perm[s:s + 32 * B], key=lambda j: lengths[j])
        batches += [pool[k:k + B] for k in range(0, len(pool), B)]
    return batches[torch.randperm(len(batches), generator=g)[i]]


@torch.no_grad()
def heldout_loss(backbone, tok, prompt, z, token_lists, cfg: TrainConfig, n_bytes: int,
                 rank: int = 0, world: int = 1) -> tuple[float, float]:
    """Reconstruction loss on held-out examples: per token (Σ ℓ / Σ tokens, batched by length) and
    in bits per byte, Σ ℓ / (ln 2 · n_bytes), which compares backbones with different tokenizers.
    n_bytes counts the UTF-8 bytes of the scored text (each example cut at max_tokens); the EOS
    is scored but adds no byte; a BOS before the prompt is context, never scored. Under torchrun each
    rank takes every world-th batch."""
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    total, count = 0.0, 0
    for j, s in enumerate(range(0, len(order), 2 * cfg.batch_size)):
        if j % world != rank:
            continue
        rows = order[s:s + 2 * cfg.batch_size]
        targets = pad_targets([token_lists[i] for i in rows], tok.eos_id, cfg.max_tokens, backbone.device)
        prefix = prepend_bos(backbone, tok, prompt(z[rows].to(backbone.device)))
        loss, n = softsrv_loss(backbone, prefix, targets, "sum")
        total, count = total + loss.item(), count + n.item()
    total, count = all_sum(world, total, count)
    return total / count, total / (math.log(2) * n_bytes)


def train(cfg: TrainConfig, resume: bool = False, show_samples: int = 3) -> dict:
    # Refuse a wrong --out / --resume before paying for the model and the contexts.
    has_ckpt = (Path(cfg.out) / CKPT_CONFIG).exists()
    if resume and not has_ckpt:
        raise ValueError(f"--resume: {cfg.out} holds no checkpoint to continue")
    if not resume and has_ckpt:
        raise ValueError(f"--out {cfg.out} already holds a checkpoint; continue it with --resume, "
                         f"or choose another --out")
    rank, world, device = init_distributed()
    if cfg.batch_size < world:
        raise ValueError(f"--batch-size {cfg.batch_size}: smaller than the {world} processes it is split across")
    log = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed)
    train_ex, held_ex = load_training_data(cfg)
    all_ex = train_ex + held_ex
    with rank0_first(rank, world):               # a first run converts the model and embeds the data once
        backbone = load_model(cfg.model, dtype=dtype_of(cfg.dtype, device), device=device)
        tok = load_tokenizer(cfg.model)
        if cfg.embed_model == cfg.model:
            enc_model, enc_tok = backbone, tok          # one copy of the weights serves as H and E
        else:
            enc_model = load_model(cfg.embed_model, dtype=dtype_of(cfg.dtype, device), device=device)
            enc_tok = load_tokenizer(cfg.embed_model)
        encoder = ContextEncoder(enc_model, enc_tok)
        z = context_vectors(encoder, cfg.embed_model, [e.text for e in all_ex], data.fingerprint(all_ex))
    z_train, z_held = z[: len(train_ex)], z[len(train_ex):]
    ids_train = [tok.encode(e.text) for e in train_ex]
    ids_held = [tok.encode(e.text) for e in held_ex]
    lengths = [min(len(ids), cfg.max_tokens) for ids in ids_train]
    bytes_held = sum(len(tok.decode(ids[:cfg.max_tokens]).encode("utf-8")) for ids in ids_held)

    record = {"config": asdict(cfg), "backbone": cfg.model, "encoder": cfg.embed_model,
              "data_fingerprint": data.fingerprint(train_ex), "n_train": len(train_ex),
              "n_heldout": len(held_ex), "method": f"SS_{cfg.param.upper()}" + (str(cfg.k) if cfg.param == "mp" else "")}
    start, history = 0, []
    if resume:
        prompt, saved = load_checkpoint(cfg.out)
        # Only the length of the run, how often it reports and where it lives may change when
        # resuming. An option newer than the checkpoint counts as its default (what it trained with).
        defaults = asdict(TrainConfig())
        diff = [k for k in record["config"] if k not in ("steps", "eval_every", "out")
                and saved["config"].get(k, defaults[k]) != record["config"][k]]
        if diff or saved["data_fingerprint"] != record["data_fingerprint"]:
            raise ValueError(f"--resume {cfg.out}: the checkpoint was trained with different settings "
                             f"({', '.join(diff) or 'data'}); rerun with the same options")
        prompt.to(device)
        opt = make_optimizer(prompt, cfg)
        load_optimizer_state(cfg.out, opt, saved)
        start, history = saved["step"], saved.get("history", [])
        log(f"resuming {cfg.out} at step {start}/{cfg.steps}")
    else:
        prompt = build_soft_prompt(cfg.param, backbone, encoder.dim, cfg.prompt_len, k=cfg.k, hidden=cfg.hidden,
                                   seed=cfg.seed).to(device)
        prompt.init_from_contexts(z_train.to(device), seed=cfg.seed)
        opt = make_optimizer(prompt, cfg)
    # DDP averages θ's gradients over the ranks; the backbone is no part of it (frozen, one per rank).
    ddp = DistributedDataParallel(prompt, broadcast_buffers=False) if world > 1 else prompt
    n_params = sum(p.numel() for p in prompt.parameters())
    log(f"{record['method']}: t={cfg.prompt_len}, {n_params:,} trainable parameters; backbone {cfg.model} "
          f"({sum(p.numel() for p in backbone.parameters()):,} frozen); {len(train_ex)} train / "
          f"{len(held_ex)} held-out examples of {cfg.data}" + (f"; {world} processes" if world > 1 else ""))

    def evaluate(step):
        loss, bpb = heldout_loss(backbone, tok, prompt, z_held, ids_held, cfg, bytes_held, rank, world)
        history.append({"step": step, "heldout_loss": round(loss, 5), "heldout_bpb": round(bpb, 5)})
        if rank == 0:
            tqdm.write(f"step {step}: held-out loss per token {loss:.4f}, bits per byte {bpb:.4f}")
        return loss

    if start == 0:
        evaluate(0)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=record["method"], dynamic_ncols=True,
               disable=rank != 0)
    t0, seen = time.time(), 0
    for step in bar:
        idx = batch_indices(cfg, step, lengths)
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        # Each rank takes every world-th example of the global batch. Its summed loss over the
        # global token count, times world (DDP averages), gives exactly the one-process gradient.
        idx = idx[rank::world]
        targets = pad_targets([ids_train[i] for i in idx], tok.eos_id, cfg.max_tokens, device)
        prefix = prepend_bos(backbone, tok, ddp(z_train[idx].to(device)))        # [BOS; P_θ(z)] on Gemma
        loss_sum, n = softsrv_loss(backbone, prefix, targets, "sum")
        loss = loss_sum / n if world == 1 else loss_sum * (world / all_sum(world, n.item())[0])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += (targets.numel() + len(idx) * cfg.prompt_len) * world
        if rank == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / n.item():.3f}", lr=f"{lr_at(cfg, step):.1e}",
                            tok_s=f"{seen / (time.time() - t0):.0f}")
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            if history[-1]["step"] != done:
                evaluate(done)
            if rank == 0:
                save_checkpoint(cfg.out, prompt, {**record, "history": history}, done, opt)
    bar.close()
    if start >= cfg.steps:
        log(f"{cfg.out} is already trained to step {start}")
    if world > 1:
        torch.distributed.barrier()                           # the last checkpoint is complete before any rank returns
    if rank != 0:
        return {"history": history, "prompt": prompt}

    if show_samples:
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        prefix = prepend_bos(backbone, tok, prompt(z_held[:show_samples].to(device)))
        texts = sample(backbone, prefix, max_new_tokens=cfg.max_tokens, temperature=1.0, eos_id=tok.eos_id,
                       generator=g)
        for i, ids in enumerate(texts):
            print(f"\n--- context (held-out, real): {held_ex[i].text}\n--- generated: {tok.decode(ids).strip()}")
    print(f"\ncheckpoint: {cfg.out}  (generate with: python generate.py --ckpt {cfg.out})")
    return {"history": history, "prompt": prompt}


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
    preset = PRESETS[args.preset]
    lr = args.lr if args.lr is not None else preset["lr"][args.param]
    cfg = TrainConfig(
        param=args.param, k=args.k, hidden=args.hidden, lr=lr, data=args.data, field=args.field, split=args.split,
        n_heldout=args.n_heldout, model=args.model, embed_model=args.embed_model or args.model,
        out=args.out or f"out/ss_{args.param}", seed=args.seed, dtype=args.dtype, preset=args.preset,
        **{k: getattr(args, k) if getattr(args, k) is not None else v for k, v in preset.items() if k != "lr"})
    if cfg.param != "mp":
        cfg.mp_decay = 0.0      # nothing of NP's or MC's θ is decayed; recorded as such
    return cfg, args.resume


def main(argv=None):
    cfg, resume = parse_args(argv)
    with cli_errors():
        train(cfg, resume=resume)


if __name__ == "__main__":
    keep_freed_memory()   # before the first big allocation (model.py says why)
    main()
