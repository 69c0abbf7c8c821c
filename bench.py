"""Speed of this project against transformers, side by side on the same weights (issue 10).

    python bench.py                        # the precision --dtype auto picks here, 3 repeats
    python bench.py --dtype both --json bench.json
    python bench.py --quick                # a smoke run: small batches, one repeat
    python bench.py --profile decode64     # where our time goes: torch.profiler's per-op table

Each workload runs ours and transformers' alternately, `--repeats` times after one untimed warm-up
each, and reports medians, so a neighbour's load on a shared machine hits both sides alike. Compare
ratios within one run, not absolute figures across runs or machines. The machine's ceiling (a matmul
at the model's MLP shape) is measured in the same run, and each figure is also given as a share of
it, counting 2 FLOP per weight per token forward and 2 more backward (4 for full fine-tuning, which
also needs the weights' gradients).

Workloads (tok/s counts every token the step processes):
- decode: a 32-token embedded prompt, 48 new tokens, batch 1/16/64, sampling at temperature 1, no
  early stop (transformers: generate(inputs_embeds=..., do_sample=True, min_new_tokens=48)).
- prefill: a 16-token soft prompt + 64 embedded tokens, batch 8, logits at every position.
- train: one SoftSRV MC step (t=32, batch 8, 64-token targets, backward to θ only, Adam step);
  transformers runs the same step through inputs_embeds.
- finetune: one full-weight step on packed 512-token rows (several examples per row, AdamW, fp32
  weights, bf16 autocast for --dtype bf16 as the fine-tuning does). Ours uses segment_ids;
  transformers gets the equivalent per-example block-causal 4-D mask and per-example position_ids.
- answer: the pipeline's answer step: GSM8K train questions as chat-format user turns, greedy, EOS
  or the 256-token cap, batch 16; rows end at their own length (many early, some at the cap).
- fewshot: eval.py's 5-shot GSM8K: 5 train exemplars + a test question, greedy, up to 256 tokens,
  stopped at the next "Question:", batch 8.
  These two count the generated tokens (up to EOS / the stop) per second and time three or four
  sides on the same prompts: "before" (the sampler until issue 25: sorted batches, each decoded
  until its last row ends), "continuous" (continuous batching, whole prompts; fewshot only), "after"
  (continuous batching, and for fewshot the shots prefilled once) and transformers' generate
  (batches of the same size, left-padded; fewshot stops with a per-row StoppingCriteria).
  `--only answer,fewshot` runs just these.

transformers is a test-only dependency: install it with `pip install -r requirements-dev.txt`.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import data
from runtime import dtype_of, keep_freed_memory
from sampling import generate_from_ids, left_pad, sample, split_common_prefix, stop_on
from softsrv import SoftPromptMC, pad_targets, softsrv_loss
from weights import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model_dir

TORCH_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class BenchConfig:
    model: str = DEFAULT_MODEL
    repeats: int = 3
    decode_batches: tuple = (1, 16, 64)
    decode_prompt: int = 32
    decode_new: int = 48
    prefill_batch: int = 8
    prefill_prompt: int = 16
    prefill_tokens: int = 64
    train_t: int = 32
    train_batch: int = 8
    train_tokens: int = 64
    finetune_rows: int = 2
    finetune_len: int = 512
    answer_prompts: int = 48       # the answer step: chat-format GSM8K questions, greedy, <= 256 tokens
    answer_batch: int = 16
    answer_cap: int = 256
    fewshot_items: int = 16        # k-shot GSM8K evaluation: 5 shots, greedy, stop at "Question:"
    fewshot_shots: int = 5
    fewshot_batch: int = 8
    fewshot_cap: int = 256
    seed: int = 0

    @classmethod
    def quick(cls, **kw) -> "BenchConfig":
        return cls(**{**dict(repeats=1, decode_batches=(1, 4), decode_new=8, prefill_batch=2,
                             prefill_tokens=16, train_batch=2, train_tokens=16, finetune_rows=1,
                             finetune_len=128, answer_prompts=6, answer_batch=4, answer_cap=16,
                             fewshot_items=4, fewshot_shots=2, fewshot_batch=2, fewshot_cap=16), **kw})


def load_transformers(folder, dtype):
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        sys.exit("error: bench.py compares against transformers, a test-only dependency: "
                 "pip install -r requirements-dev.txt")
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation="sdpa")
    return hf.eval().requires_grad_(False)


def cpu_info() -> dict:
    """The CPU's name and the flags that decide matmul speed (AVX-512, bf16, AMX)."""
    name, flags = "", []
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and not name:
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    except OSError:
        pass
    keep = [f for f in flags if f.startswith(("avx", "amx", "fma", "f16c"))]
    return {"model": name, "cores": os.cpu_count(), "flags": keep}


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def flops_per_token(model) -> float:
    """2 FLOP per weight a token meets in one forward: every block weight and the LM head."""
    n = sum(p.numel() for n_, p in model.named_parameters() if n_.startswith("blocks."))
    return 2.0 * (n + model.cfg.vocab_size * model.cfg.d_model)


def matmul_gflops(d: int, f: int, dtype, seconds: float = 1.0) -> float:
    """The best of a few matmuls at the model's MLP shapes (x @ W_up^T and x @ W_down^T)."""
    best = 0.0
    for m in (64, 512):
        for k, n in ((d, f), (f, d)):
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
            F.linear(a, b)
            reps, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / 4:
                F.linear(a, b)
                reps += 1
            best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9)
    return best


# ----------------------------------------------------------------------------------------------
# The workloads: each builder returns (ours, theirs, tokens per call); calls take no arguments.

def decode_pair(model, hf, batch: int, cfg: BenchConfig):
    g = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, model.cfg.vocab_size, (batch, cfg.decode_prompt), generator=g)
    prefix = model.embed(ids)

    def ours():
        sample(model, prefix, cfg.decode_new, temperature=1.0, eos_id=None,
               generator=torch.Generator().manual_seed(cfg.seed))

    def theirs():
        with torch.no_grad():
            hf.generate(inputs_embeds=prefix, attention_mask=torch.ones(batch, cfg.decode_prompt, dtype=torch.long),
                        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=cfg.decode_new,
                        min_new_tokens=cfg.decode_new, pad_token_id=0)
    return ours, theirs, batch * cfg.decode_new


def prefill_pair(model, hf, cfg: BenchConfig):
    g = torch.Generator().manual_seed(cfg.seed)
    T = cfg.prefill_prompt + cfg.prefill_tokens
    embeds = model.embed(torch.randint(0, model.cfg.vocab_size, (cfg.prefill_batch, T), generator=g))

    def ours():
        with torch.no_grad():
            model(embeds)

    def theirs():
        with torch.no_grad():
            hf(inputs_embeds=embeds, use_cache=False)
    return ours, theirs, cfg.prefill_batch * T


def train_pair(model, hf, cfg: BenchConfig):
    """One SS_MC step (Eq. 3 prompt, the reconstruction loss of Sec. 2), ours and through transformers."""
    g = torch.Generator().manual_seed(cfg.seed)
    d = model.cfg.d_model
    init = model.tok_emb.weight[torch.randint(0, model.cfg.vocab_size, (cfg.train_t,), generator=g)].float()
    z = torch.randn(cfg.train_batch, d, generator=g)
    targets = pad_targets(torch.randint(0, model.cfg.vocab_size, (cfg.train_batch, cfg.train_tokens),
                                        generator=g).tolist(), eos_id=0, max_tokens=cfg.train_tokens, device="cpu")
    t = cfg.train_t

    def make():
        torch.manual_seed(cfg.seed)
        prompt = SoftPromptMC(t, d, d, init)
        return prompt, torch.optim.AdamW(prompt.parameters(), lr=1e-3, weight_decay=0.0)
    p_ours, opt_ours = make()
    p_hf, opt_hf = make()
    emb = hf.get_input_embeddings()

    def ours():
        loss = softsrv_loss(model, p_ours(z), targets)
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        opt_ours.step()
        return loss.item()

    def theirs():
        text = emb(targets[:, :-1].clamp(min=0))
        x = torch.cat([p_hf(z).to(text.dtype), text], dim=1)
        logits = hf(inputs_embeds=x, use_cache=False, logits_to_keep=targets.shape[1]).logits.float()
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        opt_hf.zero_grad(set_to_none=True)
        loss.backward()
        opt_hf.step()
        return loss.item()
    return ours, theirs, cfg.train_batch * (t + targets.shape[1])


def packed_batch(cfg: BenchConfig, vocab: int):
    """Rows of finetune_len tokens, each packing examples of 48..191 tokens (the last one cut to fit)."""
    g = torch.Generator().manual_seed(cfg.seed)
    R, T = cfg.finetune_rows, cfg.finetune_len
    ids = torch.randint(0, vocab, (R, T), generator=g)
    seg = torch.empty(R, T, dtype=torch.long)
    for r in range(R):
        pos, s = 0, 0
        while pos < T:
            n = int(torch.randint(48, 192, (1,), generator=g))
            seg[r, pos:pos + n] = s
            pos, s = pos + n, s + 1
    labels = ids.roll(-1, 1)
    labels[:, :-1][seg[:, 1:] != seg[:, :-1]] = -100          # no target across a segment boundary
    labels[:, -1] = -100
    return ids, labels, seg


def finetune_pair(folder, dtype, cfg: BenchConfig):
    """One full-weight step on packed rows: fp32 master weights, bf16 autocast when dtype is bf16."""
    from transformers import AutoModelForCausalLM
    model = load_model(folder, dtype=torch.float32).train().requires_grad_(True)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa")
    hf.train().requires_grad_(True)
    if hf.config.tie_word_embeddings != model.cfg.tie_embeddings:
        raise ValueError("tied/untied head differs between the two loaders")
    ids, labels, seg = packed_batch(cfg, model.cfg.vocab_size)
    T = ids.shape[1]
    t = torch.arange(T).expand_as(seg)
    first = torch.ones_like(seg, dtype=torch.bool)
    first[:, 1:] = seg[:, 1:] != seg[:, :-1]
    position_ids = t - torch.where(first, t, 0).cummax(1).values
    block = (seg[:, :, None] == seg[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
    block = block[:, None]                                               # [B, 1, T, T], True = attend
    sel = labels != -100
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == torch.bfloat16 else nullcontext
    opt_ours = torch.optim.AdamW(model.parameters(), lr=1e-5)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-5)

    def ours():
        with autocast():
            h = model.hidden_states(model.embed(ids), segment_ids=seg)
            loss = F.cross_entropy(model.logits(h[sel]).float(), labels[sel])
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        opt_ours.step()
        return loss.item()

    def theirs():
        with autocast():
            h = hf.model(input_ids=ids, attention_mask=block, position_ids=position_ids).last_hidden_state
            loss = F.cross_entropy(hf.lm_head(h[sel]).float(), labels[sel])
        opt_hf.zero_grad(set_to_none=True)
        loss.backward()
        opt_hf.step()
        return loss.item()
    return ours, theirs, ids.numel()


# ----------------------------------------------------------------------------------------------
# Generation workloads (issue 25): the sampler before and after continuous batching

@torch.no_grad()
def batch_at_a_time(model, prompts, max_new_tokens, eos_id, stop=None, batch_size=16):
    """The sampler until issue 25 ("before"), greedy: prompts sorted by length, cut into batches,
    each left-padded and decoded by `sample` until its last row ends (a row leaves its batch when it
    ends, and no waiting prompt takes its place)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [[] for _ in prompts]
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        ids, mask = left_pad([prompts[i] for i in rows])
        gen = sample(model, model.embed(ids.to(model.device)), max_new_tokens, temperature=0, eos_id=eos_id,
                     attention_mask=mask.to(model.device), stop=stop)
        for i, toks in zip(rows, gen):
            out[i] = toks
    return out


def hf_generate(hf, prompts, max_new_tokens, eos_id, stop=None, batch_size=16, pad_id=0):
    """transformers' generate with the same settings: greedy, the same batches' size, left padding,
    EOS; `stop` (our stop_on callback) as a per-row StoppingCriteria. Returns each prompt's tokens up
    to EOS (excluded) or the stop (included), as ours counts them."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Stop(StoppingCriteria):
        def __init__(self, start):
            self.start = start

        def __call__(self, input_ids, scores, **kw):
            return torch.tensor([bool(stop(row[self.start:].tolist())) for row in input_ids])
    out = []
    for s in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[s:s + batch_size])
        crit = StoppingCriteriaList([Stop(ids.shape[1])]) if stop is not None else None
        with torch.no_grad():
            gen = hf.generate(input_ids=ids, attention_mask=mask.long(), do_sample=False, max_new_tokens=max_new_tokens,
                              eos_token_id=eos_id, pad_token_id=pad_id, stopping_criteria=crit)
        for row in gen[:, ids.shape[1]:].tolist():
            toks = []
            for t in row:
                if t == eos_id:
                    break
                toks.append(t)
                if stop is not None and stop(toks):
                    break
            out.append(toks)
    return out


def gsm8k_items(split: str, n: int):
    import data
    return data.load_examples("gsm8k", split, limit=n)


def answer_sides(model, hf, tok, cfg: BenchConfig) -> dict:
    """The answer step's decode: {side: call returning the generated token lists}."""
    from tokenizer import qa_prompt_ids
    prompts = [qa_prompt_ids(tok, e.text) for e in gsm8k_items("train", cfg.answer_prompts)]
    args = (prompts, cfg.answer_cap, tok.eos_id)
    return {"before": lambda: batch_at_a_time(model, *args, batch_size=cfg.answer_batch),
            "after": lambda: generate_from_ids(model, *args, batch_size=cfg.answer_batch),
            "hf": lambda: hf_generate(hf, *args, batch_size=cfg.answer_batch)}


def fewshot_sides(model, hf, tok, cfg: BenchConfig) -> dict:
    """eval.py's k-shot GSM8K decode: {side: call returning the generated token lists}."""
    from tasks import GSM8K_STOPS, gsm8k_prompt
    shots = gsm8k_items("train", cfg.fewshot_shots)
    prompts = [tok.encode(gsm8k_prompt(shots, e.text)) for e in gsm8k_items("test", cfg.fewshot_items)]
    prefix, rest = split_common_prefix(prompts)
    stop = stop_on(tok, GSM8K_STOPS)
    kw = dict(stop=stop, batch_size=cfg.fewshot_batch)
    return {"before": lambda: batch_at_a_time(model, prompts, cfg.fewshot_cap, tok.eos_id, **kw),
            "continuous": lambda: generate_from_ids(model, prompts, cfg.fewshot_cap, tok.eos_id, **kw),
            "after": lambda: generate_from_ids(model, rest, cfg.fewshot_cap, tok.eos_id, prefix=prefix, **kw),
            "hf": lambda: hf_generate(hf, prompts, cfg.fewshot_cap, tok.eos_id, **kw)}


def race_sides(sides: dict, repeats: int, log=print) -> dict:
    """Median generated tokens per second of each side, the sides run in turn (the order rotates
    every repeat), after one untimed warm-up each. Also the token count and rows at the cap."""
    stats = {}
    for name, fn in sides.items():
        toks = fn()
        stats[name] = {"tokens": sum(map(len, toks)), "times": []}
    names = list(sides)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            stats[name]["times"].append(timed(sides[name]))
    return {n: {"tok_s": round(st["tokens"] / statistics.median(st["times"]), 2), "tokens": st["tokens"],
                "seconds": round(statistics.median(st["times"]), 2)} for n, st in stats.items()}


# ----------------------------------------------------------------------------------------------

def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def race(ours, theirs, tokens: int, repeats: int) -> tuple[float, float]:
    """Median tok/s of each side, run alternately (who goes first swaps every repeat)."""
    ours(), theirs()                                                  # warm-up, untimed
    a, b = [], []
    for r in range(repeats):
        if r % 2 == 0:
            a.append(timed(ours)), b.append(timed(theirs))
        else:
            b.append(timed(theirs)), a.append(timed(ours))
    return tokens / statistics.median(a), tokens / statistics.median(b)


WORKLOADS = ("decode", "prefill", "train", "finetune", "answer", "fewshot")


def bench_dtype(name: str, cfg: BenchConfig, log=print, workloads=WORKLOADS) -> dict:
    dtype = TORCH_DTYPE[name]
    folder = resolve_model_dir(cfg.model)
    model = load_model(folder, dtype=dtype)
    hf = load_transformers(folder, dtype)
    fpt = flops_per_token(model)
    ceiling = matmul_gflops(model.cfg.d_model, model.cfg.d_ff, dtype)
    res = {"matmul_gflops": round(ceiling, 1), "flops_per_token": fpt, "load_avg": {},
           "mlp_shape": [model.cfg.d_model, model.cfg.d_ff]}

    def record(key, ours_tok_s, hf_tok_s, flop_factor, sub=None):
        for k, v in ((key, ours_tok_s), (f"hf_{key}", hf_tok_s)):
            if sub is None:
                res[k] = round(v, 2)
            else:
                res.setdefault(k, {})[sub] = round(v, 2)
        share = ours_tok_s * fpt * flop_factor / 1e9 / ceiling
        label = key.removesuffix("_tok_s") + (f" b{sub}" if sub is not None else "")
        res.setdefault("share_of_matmul", {})[label] = round(share, 3)
        res["load_avg"][label] = round(load_average(), 2)
        log(f"[{name}] {label:<12} ours {ours_tok_s:8.1f} tok/s   transformers {hf_tok_s:8.1f} tok/s   "
            f"ratio {ours_tok_s / hf_tok_s:5.2f}x   {share:6.1%} of matmul   load {load_average():.2f}")

    if "decode" in workloads:
        for b in cfg.decode_batches:
            record("decode_tok_s", *race(*decode_pair(model, hf, b, cfg), cfg.repeats), 1, sub=b)
    if "prefill" in workloads:
        record("prefill_tok_s", *race(*prefill_pair(model, hf, cfg), cfg.repeats), 1)
    if "train" in workloads:
        record("train_tok_s", *race(*train_pair(model, hf, cfg), cfg.repeats), 2)
    tok = load_tokenizer(folder) if {"answer", "fewshot"} & set(workloads) else None
    for w, sides in (("answer", answer_sides), ("fewshot", fewshot_sides)):
        if w in workloads:
            res[w] = race_sides(sides(model, hf, tok, cfg), cfg.repeats)
            res["load_avg"][w] = round(load_average(), 2)
            log(f"[{name}] {w:<12} " + "   ".join(f"{k} {v['tok_s']:7.1f} tok/s" for k, v in res[w].items())
                + f"   ({res[w]['after']['tokens']} tokens; load {load_average():.2f})")
    del model, hf
    if "finetune" in workloads:
        record("finetune_tok_s", *race(*finetune_pair(folder, dtype, cfg), cfg.repeats), 3)
    return res


KEYS = ["decode_tok_s", "hf_decode_tok_s", "prefill_tok_s", "hf_prefill_tok_s", "train_tok_s", "hf_train_tok_s",
        "finetune_tok_s", "hf_finetune_tok_s"]


def auto_dtype() -> str:
    """The precision the project's `--dtype auto` picks on this machine (runtime.dtype_of)."""
    return "bf16" if dtype_of("auto") == torch.bfloat16 else "fp32"


def threads() -> int:
    """OMP_NUM_THREADS when set (e.g. 1 on a machine other jobs share), else every core."""
    return int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1


def run(cfg: BenchConfig, dtypes: list[str], log=print, workloads=WORKLOADS) -> dict:
    torch.set_num_threads(threads())
    info = cpu_info()
    log(f"CPU: {info['model']} ({info['cores']} cores); flags {' '.join(info['flags'])}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; load {load_average():.2f}")
    by_dtype = {name: bench_dtype(name, cfg, log, workloads) for name in dtypes}
    top = auto_dtype()                                                 # the default dtype's figures
    top = top if top in by_dtype else dtypes[0]
    main = by_dtype[top]
    out = {k: main[k] for k in KEYS + ["answer", "fewshot"] if k in main}
    shape = by_dtype[dtypes[0]]["mlp_shape"]
    ceilings = {n: by_dtype[n]["matmul_gflops"] if n in by_dtype else round(matmul_gflops(*shape, TORCH_DTYPE[n]), 1)
                for n in TORCH_DTYPE}
    out.update(matmul_gflops_fp32=ceilings["fp32"], matmul_gflops_bf16=ceilings["bf16"],
               peak_rss_mb=round(peak_rss_mb(), 1), cpu_flags=info["flags"], cpu_model=info["model"],
               dtype=top, repeats=cfg.repeats,
               torch=torch.__version__, by_dtype=by_dtype)
    return out


def table(out: dict) -> str:
    lines = ["| workload | dtype | ours tok/s | transformers tok/s | ratio | share of matmul |", "|---|---|---|---|---|---|"]
    gen = []
    for name, r in out["by_dtype"].items():
        rows = [(f"decode b{b}", r["decode_tok_s"][b], r["hf_decode_tok_s"][b], f"decode b{b}") for b in r.get("decode_tok_s", {})]
        rows += [(k, r[f"{k}_tok_s"], r[f"hf_{k}_tok_s"], k) for k in ("prefill", "train", "finetune") if f"{k}_tok_s" in r]
        for label, a, b, key in rows:
            lines.append(f"| {label} | {name} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {r['share_of_matmul'][key]:.0%} |")
        for w in ("answer", "fewshot"):
            if w in r:
                sides = r[w]
                gen.append(f"| {w} | {name} | " + " | ".join(f"{sides[k]['tok_s']:.1f}" if k in sides else "-"
                                                             for k in ("before", "continuous", "after", "hf"))
                           + f" | {sides['after']['tok_s'] / sides['before']['tok_s']:.2f}x"
                           + f" | {sides['after']['tok_s'] / sides['hf']['tok_s']:.2f}x | {sides['after']['tokens']} |")
    if gen:
        lines += ["", "| generation | dtype | before tok/s | continuous | after | transformers | after/before "
                      "| after/transformers | tokens |", "|---|---|---|---|---|---|---|---|---|"] + gen
    lines.append(f"\nmatmul ceiling: fp32 {out['matmul_gflops_fp32']} GFLOP/s, bf16 {out['matmul_gflops_bf16']} "
                 f"GFLOP/s; peak RSS {out['peak_rss_mb']:.0f} MB; CPU {out['cpu_model']}: {' '.join(out['cpu_flags'])}")
    return "\n".join(lines)


def profile(cfg: BenchConfig, workload: str, dtype: str, log=print) -> str:
    """torch.profiler's per-op table (self CPU time) of one call of our side of a workload, after a
    warm-up call: what docs/performance.md's "where the time went" figures come from."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    folder = resolve_model_dir(cfg.model)
    if workload == "finetune":
        ours = finetune_pair(folder, TORCH_DTYPE[dtype], cfg)[0]
    else:
        model, hf = load_model(folder, dtype=TORCH_DTYPE[dtype]), load_transformers(folder, TORCH_DTYPE[dtype])
        if workload.startswith("decode"):
            ours = decode_pair(model, hf, int(workload.removeprefix("decode")), cfg)[0]
        else:
            ours = {"prefill": prefill_pair, "train": train_pair}[workload](model, hf, cfg)[0]
    ours()
    log(f"{workload} ({dtype}): one call took {timed(ours):.2f} s; profiling the next one")
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        ours()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", default=DEFAULT_MODEL, help=f"weights both sides load (default {DEFAULT_MODEL})")
    a("--dtype", choices=["auto", "fp32", "bf16", "both"], default="auto",
      help="precision of the runs; 'auto' = the one the project's --dtype auto picks on this machine, "
           "whose figures the top-level JSON keys hold when it ran (default auto)")
    a("--repeats", type=int, help="timed runs of each workload per side; the median counts (default 3, quick 1)")
    a("--json", help="also write the results to this JSON file")
    a("--answer-prompts", type=int, help="prompts of the answer workload (default 48)")
    a("--fewshot-items", type=int, help="questions of the fewshot workload (default 16)")
    a("--quick", action="store_true", help="a smoke run: batches 1/4, 8 new tokens, short rows, one repeat")
    a("--only", help=f"comma-separated workloads to run (default all: {','.join(WORKLOADS)})")
    a("--profile", metavar="WORKLOAD",
      help="instead of the race: profile our side of one workload (decode1, decode16, decode64, prefill, train, "
           "finetune; decode<B> takes any batch size) and print torch.profiler's per-op table")
    args = p.parse_args(argv)
    kw = {"model": args.model} | ({"repeats": args.repeats} if args.repeats else {})
    kw |= {k: v for k, v in (("answer_prompts", args.answer_prompts), ("fewshot_items", args.fewshot_items)) if v}
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be at least 1")
    cfg = BenchConfig.quick(**kw) if args.quick else BenchConfig(**kw)
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [auto_dtype() if args.dtype == "auto" else args.dtype]
    if args.profile:
        w = args.profile
        if not (w in ("prefill", "train", "finetune") or (w.startswith("decode") and w[6:].isdigit() and int(w[6:]) > 0)):
            p.error(f"--profile {w}: expected decode<batch> (e.g. decode64), prefill, train or finetune")
        if len(dtypes) > 1:
            p.error("--profile takes one precision: --dtype auto, fp32 or bf16")
        torch.set_num_threads(threads())
        try:
            print(profile(cfg, w, dtypes[0]))
        except ValueError as e:
            sys.exit(f"error: {e}")
        return
    workloads = WORKLOADS if not args.only else tuple(args.only.split(","))
    if set(workloads) - set(WORKLOADS):
        p.error(f"--only: unknown workload(s) {', '.join(sorted(set(workloads) - set(WORKLOADS)))}; "
                f"choose from {', '.join(WORKLOADS)}")
    try:
        out = run(cfg, dtypes, workloads=workloads)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(table(out))
    if args.json:
        data.write_json(args.json, out)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    keep_freed_memory()   # before the first big allocation (model.py says why)
    main()
