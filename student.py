"""The student (paper Sec. 3.3, step 5): fine-tuning an LM on (question, answer) pairs.

The student is the project's own decoder (model.py) with every weight trainable. Each pair becomes
prompt = the question in the student's chat format (tokenizer.qa_prompt_ids, the format the answer
loss of tasks.py scores) and target = the answer and its end-of-turn token; the loss counts answer
tokens only. Pairs are packed into rows of seq_len tokens; `segment_ids` keep attention inside each
pair and restart positions, so packing changes nothing but the amount of padding. AdamW, linear
warm-up then cosine (paper: batch 16 rows of 8192 tokens, warm-up 0 -> 1e-6 over 100 steps). Weights
and AdamW state stay fp32; matmuls run in bf16 under autocast where the CPU has bf16 units.

At each checkpoint step the model is written as a Hugging Face-layout folder `<out>/step-N`
(load_model and transformers read it back) with the optimizer state beside it in the newest one;
running the same config again resumes from the newest complete `step-N`. finetune.py is its CLI.
"""
from __future__ import annotations

import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
from runtime import default_device, dtype_of
from softsrv import CKPT_STATE, load_optimizer_state, lr_at, save_optimizer_state
from tokenizer import qa_answer_ids, qa_prompt_ids
from weights import DEFAULT_MODEL, load_model, load_tokenizer, save_model

STATE_JSON = "finetune.json"

# Paper (Sec. 3.3): batch 16, length 8192, warm-up 0 -> 1e-6 over 100 steps, then cosine; Gemma 2B
# on 50K pairs. The cpu preset fine-tunes a 135M student on ~1K pairs on 2 cores, so (see pipeline.py
# for the measured reasons): rows of 1024 tokens, 8 rows a step, a larger peak lr.
PRESETS = {
    "tiny": dict(seq_len=256, batch_size=2, lr=1e-4, warmup=1, epochs=1.0, n_checkpoints=2),
    "cpu": dict(seq_len=1024, batch_size=8, lr=2e-5, warmup=5, epochs=1.0, n_checkpoints=3),
    "paper": dict(seq_len=8192, batch_size=16, lr=1e-6, warmup=100, epochs=1.0, n_checkpoints=5),
}


@dataclass
class FinetuneConfig:
    data: str = ""                     # JSONL with "question" and "answer" fields
    out: str = "out/finetune"
    model: str = DEFAULT_MODEL         # the student
    seq_len: int = 1024                # tokens per packed row
    batch_size: int = 8                # packed rows per optimizer step
    micro_batch: int = 2               # rows per forward/backward (gradient accumulation)
    lr: float = 2e-5                   # peak learning rate
    warmup: int = 5                    # linear warm-up steps from 0
    epochs: float = 1.0                # passes over the pairs; sets the number of steps
    fixed_steps: int = 0               # > 0: exactly this many steps, whatever --epochs says
    weight_decay: float = 0.0
    save_at: list[int] = field(default_factory=list)   # checkpoint steps (default: evenly spaced)
    n_checkpoints: int = 3             # used when save_at is empty
    seed: int = 0
    dtype: str = "auto"                # matmul precision (bf16 autocast or fp32); weights stay fp32
    steps: int = 0                     # filled in from the data: ceil(epochs * rows / batch_size)


def finetune_config(preset: str = "cpu", **given) -> FinetuneConfig:
    """A FinetuneConfig from a preset (PRESETS) and the settings given explicitly (None = the preset's)."""
    return FinetuneConfig(**{**PRESETS[preset], **{k: v for k, v in given.items() if v is not None}})


def load_pairs(path: str) -> list[tuple[str, str]]:
    """(question, answer) pairs from a JSONL file; one line naming the record when one is malformed."""
    pairs = []
    for n, r in enumerate(data.read_jsonl(path), 1):
        if not isinstance(r, dict) or not isinstance(r.get("question"), str) or not isinstance(r.get("answer"), str):
            raise ValueError(f"{path}: record {n} needs string fields 'question' and 'answer'")
        pairs.append((r["question"], r["answer"]))
    if not pairs:
        raise ValueError(f"{path}: no (question, answer) pairs")
    return pairs


def encode_pairs(tok, pairs: list[tuple[str, str]], seq_len: int) -> list[tuple[list[int], int]]:
    """Each pair -> (prompt + answer ids, number of prompt ids), cut to seq_len tokens. The prompt
    count is taken after the cut, so a pair whose prompt alone fills seq_len has no answer tokens
    (and adds nothing to the loss or to its divisor) instead of a negative count."""
    out = []
    for q, a in pairs:
        p = qa_prompt_ids(tok, q)
        ids = (p + qa_answer_ids(tok, a))[:seq_len]
        out.append((ids, min(len(p), len(ids))))
    return out


def pack(examples: list[tuple[list[int], int]], seq_len: int, seed: int) -> list[list[int]]:
    """Greedy first-fit packing of shuffled examples into rows of at most seq_len tokens.
    Returns, per row, the indices of the examples in it."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    rows, free = [], []
    for i in order:
        n = len(examples[i][0])
        for r, f in enumerate(free):
            if f >= n:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(seq_len - n)
    return rows


def collate(examples, rows: list[list[int]], seq_len: int, device):
    """Packed rows -> ids, labels (-100 = no loss: prompt tokens, padding, each example's first
    token), segment_ids (-1 on padding). labels[t] is the token that position t predicts."""
    B = len(rows)
    ids = torch.zeros(B, seq_len, dtype=torch.long)
    labels = torch.full((B, seq_len), -100, dtype=torch.long)
    seg = torch.full((B, seq_len), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        pos = 0
        for s, i in enumerate(row):
            toks, n_prompt = examples[i]
            T = len(toks)
            ids[b, pos:pos + T] = torch.tensor(toks)
            seg[b, pos:pos + T] = s
            # position j predicts token j+1; only answer tokens are targets
            tgt = torch.tensor(toks[1:] + [-100])
            tgt[: max(n_prompt - 1, 0)] = -100
            labels[b, pos:pos + T] = tgt
            pos += T
    return ids.to(device), labels.to(device), seg.to(device)


def packed_loss(model, ids, labels, seg) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over answer tokens, and their count. The LM head runs only where there
    is a target (about half the positions), which halves its cost and its memory."""
    h = model.hidden_states(model.embed(ids), segment_ids=seg)
    sel = labels != -100
    logits = model.logits(h[sel]).float()
    return F.cross_entropy(logits, labels[sel], reduction="sum"), int(sel.sum())


def checkpoint_steps(cfg: FinetuneConfig) -> list[int]:
    if cfg.save_at:
        return sorted({s for s in cfg.save_at if 0 < s <= cfg.steps} | {cfg.steps})
    n = max(1, cfg.n_checkpoints)
    return sorted({max(1, round(cfg.steps * (k + 1) / n)) for k in range(n)})


def latest_state(out: Path) -> Path | None:
    """The newest step-N folder that holds a complete resume state (JSON written last)."""
    best = None
    for d in out.glob("step-*"):
        if (d / STATE_JSON).exists() and (d / CKPT_STATE).exists():
            step = data.read_json(d / STATE_JSON)["step"]
            if best is None or step > best[0]:
                best = (step, d)
    return best and best[1]


def completed_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every finished checkpoint, in step order."""
    found = []
    for d in out.glob("step-*"):
        if (d / STATE_JSON).exists():
            found.append((data.read_json(d / STATE_JSON)["step"], d))
    return sorted(found)


def save_state(model, opt, cfg: FinetuneConfig, step: int, record: dict) -> Path:
    """<out>/step-N: HF weights (fp32), the AdamW state, then the JSON; the folder appears only
    whole (built under a temporary name, then renamed). Older folders keep their weights only."""
    out = Path(cfg.out)
    final = out / f"step-{step}"
    with data.atomic_folder(final) as tmp:
        save_model(model, tmp, metadata={"finetuned_from": cfg.model, "step": step})
        groups = save_optimizer_state(tmp, opt, step)
        data.write_json(tmp / STATE_JSON, {**record, "step": step, "optimizer_param_groups": groups})
    for d in out.glob("step-*"):                 # only the newest state is needed to resume
        if d != final and (d / CKPT_STATE).exists():
            (d / CKPT_STATE).unlink()
    return final


def finetune(cfg: FinetuneConfig, progress: bool = True) -> list[tuple[int, Path]]:
    """Run (or resume) the fine-tuning; returns every checkpoint as (step, folder)."""
    t0 = time.time()
    device = default_device()
    out = Path(cfg.out)
    pairs = load_pairs(cfg.data)
    tok = load_tokenizer(cfg.model)
    examples = encode_pairs(tok, pairs, cfg.seq_len)
    rows = pack(examples, cfg.seq_len, cfg.seed)
    per_epoch = -(-len(rows) // cfg.batch_size)
    cfg.steps = cfg.fixed_steps or max(1, round(cfg.epochs * per_epoch))
    n_tok = sum(len(t) for t, _ in examples)
    n_ans = sum(len(t) - p for t, p in examples)
    record = {"config": asdict(cfg), "n_pairs": len(pairs), "n_rows": len(rows), "tokens": n_tok,
              "answer_tokens": n_ans, "data_fingerprint": data.fingerprint(
                  data.Example(text=q + "\0" + a, id=str(i)) for i, (q, a) in enumerate(pairs))}
    saves = checkpoint_steps(cfg)
    print(f"finetune: {len(pairs)} pairs, {n_tok:,} tokens ({n_ans:,} answer tokens) packed into "
          f"{len(rows)} rows of {cfg.seq_len} ({n_tok / (len(rows) * cfg.seq_len):.0%} full); "
          f"{cfg.steps} steps of {cfg.batch_size} rows; checkpoints at {saves}")

    state = latest_state(out) if out.exists() else None
    start, history = 0, []
    if state is not None:
        saved = data.read_json(state / STATE_JSON)
        diff = [k for k in record["config"] if k not in ("out",) and saved["config"].get(k) != record["config"][k]]
        if diff or saved["data_fingerprint"] != record["data_fingerprint"]:
            raise ValueError(f"{out}: holds a fine-tuning run with other settings "
                             f"({', '.join(diff) or 'data'}); choose another --out or delete it")
        model = load_model(state, dtype=torch.float32, device=device)
        start, history = saved["step"], saved["history"]
    else:
        model = load_model(cfg.model, dtype=torch.float32, device=device)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if state is not None:
        load_optimizer_state(state, opt, saved)
        print(f"finetune: resuming {state} at step {start}/{cfg.steps}")
    if start >= cfg.steps:
        return completed_checkpoints(out)

    use_bf16 = dtype_of(cfg.dtype, device) == torch.bfloat16
    autocast = (lambda: torch.autocast(device_type=device, dtype=torch.bfloat16)) if use_bf16 else nullcontext
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="finetune", disable=not progress,
               dynamic_ncols=True)
    t_start, seen = time.time(), 0
    for step in bar:
        epoch, i = divmod(step, per_epoch)
        order = list(range(len(rows)))
        random.Random(cfg.seed * 1_000_003 + epoch).shuffle(order)    # depends on (seed, epoch) only
        batch = [rows[j] for j in order[i * cfg.batch_size:(i + 1) * cfg.batch_size]]
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        opt.zero_grad(set_to_none=True)
        chunks = [batch[k:k + cfg.micro_batch] for k in range(0, len(batch), cfg.micro_batch)]
        total_tokens = sum(len(examples[e][0]) - examples[e][1] for r in batch for e in r)
        loss_sum = 0.0
        for chunk in chunks:
            ids, labels, seg = collate(examples, chunk, cfg.seq_len, device)
            with autocast():
                loss, n = packed_loss(model, ids, labels, seg)
            (loss / max(total_tokens, 1)).backward()  # mean over the step's answer tokens
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seen += sum(len(examples[e][0]) for r in batch for e in r)
        done = step + 1
        history.append({"step": done, "train_loss": round(loss_sum / max(total_tokens, 1), 5),
                        "lr": lr_at(cfg, step)})
        bar.set_postfix(loss=f"{loss_sum / max(total_tokens, 1):.3f}", lr=f"{lr_at(cfg, step):.1e}",
                        tok_s=f"{seen / (time.time() - t_start):.0f}")
        if done in saves:
            path = save_state(model, opt, cfg, done, {**record, "history": history})
            tqdm.write(f"finetune: step {done}: train loss {history[-1]['train_loss']:.4f}, saved {path}")
    bar.close()
    print(f"finetune: done, {cfg.steps} steps in {time.time() - t0:.0f}s")
    return completed_checkpoints(out)
