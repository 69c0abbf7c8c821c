"""The one sampler: KV-cached decoding from embedded prompts (SoftSRV's P_θ(z), Sec. 2) or from token
ids (template completions, answers, evaluation), with temperature, top-k / top-p and stop rules.

- `sample`: prefill a batch of embedded prompts [B, t, d] into the KV cache, then decode token by token.
- `generate_from_ids`: token-id prompts -> generated ids, batched by length and left-padded.
- `stop_on` / `cut_at`: stop strings for few-shot formats ("Question:" starts the next exemplar).
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from model import Transformer


def left_pad(rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths -> (ids [B, T], mask [B, T]), padded on the left so that every
    row's next token goes to the same KV-cache slot (the cache's layout)."""
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = torch.as_tensor(r)
        mask[b, T - len(r):] = True
    return ids, mask



def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus.

    The nucleus is the smallest set of most likely tokens whose mass reaches top_p. Sorting the
    whole vocabulary for it, every row and every step, can cost a CPU more than the rest of the
    decode step, so each row's candidates come from a top-k that grows (256, 2048, then the full
    sort) until it holds that row's nucleus: for a real LM's next-token distributions almost
    always the first (docs/performance.md).
    """
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        V = logits.shape[-1]
        flat = logits.reshape(-1, V)
        log_total = flat.logsumexp(-1, keepdim=True)
        cut = flat.new_empty(flat.shape[0], 1)             # per row: the smallest logit it keeps
        todo, k = torch.arange(flat.shape[0], device=flat.device), min(256, V)
        while len(todo):
            sub = flat[todo]
            top = sub.sort(-1, descending=True).values if k >= V else sub.topk(k, -1).values
            p = (top - log_total[todo]).exp()
            before = p.cumsum(-1) - p                      # mass of the tokens above each one
            found = (before[:, -1] + p[:, -1] >= top_p) | (k >= V)
            n_keep = (before[found] < top_p).sum(-1, keepdim=True).clamp(min=1)
            cut[todo[found]] = top[found].gather(-1, n_keep - 1)
            todo, k = todo[~found], (k * 8 if k * 8 < V // 4 else V)
        logits = logits.masked_fill(logits < cut.view(*logits.shape[:-1], 1), float("-inf"))
    return logits


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs [B, V] by inverting the CDF with one uniform number per row.

    Exactly the categorical distribution, like torch.multinomial, which on a CPU instead draws an
    exponential for every vocabulary entry: at a large batch that dominates a decode step
    (docs/performance.md).
    """
    cdf = probs.cumsum(-1)
    total = cdf[..., -1:].contiguous()                  # [B, 1]: searchsorted wants it contiguous
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=cdf.dtype) * total
    tok = torch.searchsorted(cdf, u, right=True)
    # u can round up to the total; the last token with mass is the first whose cdf reaches it
    return torch.minimum(tok, torch.searchsorted(cdf, total))[..., 0]


@torch.no_grad()
def sample(model: Transformer, prefix_embeds: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None,
           generator: torch.Generator | None = None, attention_mask: torch.Tensor | None = None,
           stop=None) -> list[list[int]]:
    """x' ~ H(P): prefill the prompts [B, t, d] into a KV cache, then decode one token at a time.

    The prompt is only embeddings (for SoftSRV, no text tokens at all). temperature 0 is greedy.
    Each row stops at its own EOS (not included in its output) and leaves the batch, so finished
    rows cost nothing. A left-padded batch of text prompts passes attention_mask [B, t]. The
    generator must live on the model's device. `stop(tokens so far) -> bool`, checked per row after
    each token, ends that row too (its last token kept): e.g. when a few-shot answer starts the next
    "Question:".
    """
    B, t, _ = prefix_embeds.shape
    cache = model.new_cache(B, t + max_new_tokens)
    logits = model.logits(model.hidden_states(prefix_embeds.to(model.dtype), attention_mask, cache)[:, -1])
    out = [[] for _ in range(B)]
    alive = list(range(B))                       # batch row -> sample it belongs to
    for n in range(max_new_tokens):
        logits = logits.float()
        if temperature == 0:
            tok = logits.argmax(-1)
        else:
            tok = draw(filter_logits(logits / temperature, top_k, top_p).softmax(-1), generator)
        toks = tok.tolist()                          # the step's one device -> host sync
        ended = [tk == eos_id for tk in toks]
        for i, tk, end in zip(alive, toks, ended):
            if not end:
                out[i].append(tk)
        if stop is not None:
            ended = [end or stop(out[i]) for i, end in zip(alive, ended)]
        if any(ended):
            alive = [i for i, end in zip(alive, ended) if not end]
            if not alive:
                break
            keep = torch.tensor([not end for end in ended], device=tok.device)
            cache.keep_rows(keep)
            tok = tok[keep]
        if n + 1 < max_new_tokens:
            logits = model.logits(model.hidden_states(model.embed(tok[:, None]), cache=cache)[:, -1])
    return out


def generate_from_ids(model: Transformer, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None,
                      temperature: float = 0.0, top_p: float = 1.0, stop=None, batch_size: int = 16,
                      seed: int = 0, progress: bool = False) -> list[list[int]]:
    """The project's sampler for *text* prompts: token-id prompts -> generated ids, in input order.

    Prompts are sorted by length and cut into batches (less padding), each batch left-padded so all
    rows decode at the same cache slot, and run through `sample` (KV cache). Batch b samples with
    the seed (seed, b), so a run is reproducible for a fixed batch size. EOS is not included.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate_from_ids: empty prompt (at least one token needed)")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    dev = model.device
    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress, leave=False)
    for b, s in enumerate(range(0, len(order), batch_size)):
        rows = order[s:s + batch_size]
        ids, mask = left_pad([prompts[i] for i in rows])
        g = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + b)
        gen = sample(model, model.embed(ids.to(dev)), max_new_tokens, temperature=temperature, top_p=top_p,
                     eos_id=eos_id, generator=g, attention_mask=mask.to(dev), stop=stop)
        for i, toks in zip(rows, gen):
            out[i] = toks
        bar.update(len(rows))
    bar.close()
    return out


# Stop strings

def stop_on(tok, stops: list[str], window: int = 12):
    """A `sample` stop callback: True once the last `window` tokens' text holds any stop string."""
    return lambda ids: any(s in tok.decode(ids[-window:]) for s in stops)


def cut_at(text: str, stops: list[str]) -> str:
    """The text up to the first stop string."""
    for s in stops:
        text = text.split(s, 1)[0]
    return text
