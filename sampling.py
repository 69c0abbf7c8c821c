"""The one sampler: KV-cached decoding from embedded prompts (SoftSRV's P_θ(z), Sec. 2) or from token
ids (template completions, answers, evaluation), with temperature, top-k / top-p and stop rules.

- `sample`: prefill a batch of embedded prompts [B, t, d] into the KV cache, then decode token by token.
- `generate_from_ids`: token-id prompts -> generated ids, batched by length and left-padded.
- `stop_on` / `cut_at`: stop strings for few-shot formats ("Question:" starts the next exemplar).
"""
from __future__ import annotations

import hashlib
from collections import deque

import torch
from tqdm import tqdm

from model import Transformer, row_invariant


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



def _as_rows(x: torch.Tensor, fn):
    """fn(x) for x [B, V], with B = 1 computed as two copies of the row: a reduction over one row
    (logsumexp, cumsum, softmax) is split across threads or vector lanes differently from the same
    row in a batch, which moves its last bits, and a top-p cut or a draw near a boundary with them.
    So a prompt's tokens do not change when it decodes alone (generate_from_ids)."""
    return fn(x) if x.shape[0] != 1 else fn(x.expand(2, *x.shape[1:]))[:1]


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
        log_total = _as_rows(flat, lambda x: x.logsumexp(-1, keepdim=True))
        cut = flat.new_empty(flat.shape[0], 1)             # per row: the smallest logit it keeps
        todo, k = torch.arange(flat.shape[0], device=flat.device), min(256, V)
        while len(todo):
            n = len(todo)
            sub = flat[todo] if n > 1 else flat[todo].expand(2, -1)    # see _as_rows
            top = sub.sort(-1, descending=True).values if k >= V else sub.topk(k, -1).values
            p = (top - log_total[todo]).exp()
            before = (p.cumsum(-1) - p)[:n]                # mass of the tokens above each one
            top, p = top[:n], p[:n]
            found = (before[:, -1] + p[:, -1] >= top_p) | (k >= V)
            n_keep = (before[found] < top_p).sum(-1, keepdim=True).clamp(min=1)
            cut[todo[found]] = top[found].gather(-1, n_keep - 1)
            todo, k = todo[~found], (k * 8 if k * 8 < V // 4 else V)
        logits = logits.masked_fill(logits < cut.view(*logits.shape[:-1], 1), float("-inf"))
    return logits


def draw(probs: torch.Tensor, generator: torch.Generator | None = None,
         uniform: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of probs [B, V] by inverting the CDF with one uniform number per row
    (`uniform` [B] in [0, 1) when given, e.g. one from each row's own generator; else drawn from
    `generator`).

    Exactly the categorical distribution, like torch.multinomial, which on a CPU instead draws an
    exponential for every vocabulary entry: at a large batch that dominates a decode step
    (docs/performance.md).
    """
    cdf = probs.cumsum(-1)
    total = cdf[..., -1:].contiguous()                  # [B, 1]: searchsorted wants it contiguous
    if uniform is None:
        uniform = torch.rand(total.shape, generator=generator, device=probs.device, dtype=cdf.dtype)
    u = uniform.to(cdf.dtype).view(total.shape) * total
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


def row_seed(seed: int, index: int) -> int:
    """The seed of prompt `index`'s own generator in a call with `seed`: a hash of the pair, so
    prompts of one call and calls with neighbouring seeds get unrelated streams."""
    digest = hashlib.blake2b(f"{seed},{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def split_common_prefix(prompts: list[list[int]], min_suffix: int = 1) -> tuple[list[int], list[list[int]]]:
    """(prefix, suffixes): the longest run of token ids every prompt starts with (e.g. the k-shot
    exemplars), leaving each prompt at least `min_suffix` tokens of its own, and what is left of
    each prompt. prefix + suffixes[i] == prompts[i], so splitting the *token ids* of whole prompts
    (not the text) keeps exactly the tokens encoding the whole string gives."""
    if not prompts:
        return [], []
    first, n = prompts[0], min(len(p) for p in prompts) - min_suffix
    k = 0
    while k < n and all(p[k] == first[k] for p in prompts):
        k += 1
    return list(first[:k]), [list(p[k:]) for p in prompts]


def _pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generators) -> torch.Tensor:
    """The next token of each row: argmax at temperature 0, else a draw with the row's own generator."""
    if temperature == 0:
        return logits.argmax(-1)
    u = torch.cat([torch.rand(1, generator=g, device=logits.device, dtype=torch.float32) for g in generators])
    return _as_rows(torch.cat([logits, u[:, None]], -1), lambda x: draw(
        filter_logits(x[:, :-1] / temperature, top_k, top_p).softmax(-1), uniform=x[:, -1]))


@torch.no_grad()
@row_invariant()
def generate_from_ids(model: Transformer, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None,
                      temperature: float = 0.0, top_p: float = 1.0, stop=None, batch_size: int = 16,
                      seed: int = 0, progress: bool = False, *, prefix: list[int] | None = None,
                      top_k: int = 0, seeds: list[int] | None = None, return_finished: bool = False,
                      prefill_chunk: int = 512, min_new_tokens: int = 0):
    """The project's sampler for *text* prompts: token-id prompts -> generated ids, in input order.

    Continuous batching: `batch_size` rows decode together in a RowCache; when a row ends (EOS,
    `stop`, or max_new_tokens) the next waiting prompt takes its row, prefilled into the cache while
    the other rows keep their place, so the batch stays full until the prompts run out (then the
    cache is compacted to the rows still running). EOS is not included in the output.
    A prompt's logits do not depend on the other rows (row_invariant kernels, each prompt prefilled
    by itself, RowCache attention), so neither do its tokens (docs/performance_sampler.md).

    prefix: token ids every prompt starts with (k-shot exemplars, an instruction). They are prefilled
    once and their keys/values shared by every row; `prompts` then holds only each prompt's own rest
    (at least one token), so prompt i is prefix + prompts[i]. `split_common_prefix` finds it.
    Randomness: prompt i draws from its own generator, seeded with seeds[i] (default
    row_seed(seed, i)), so what a prompt produces does not depend on the batch size or on which
    prompts share its batch. Greedy (temperature 0) is decoding each prompt alone.
    return_finished: also return, per prompt, whether it ended by EOS or `stop` before the cap.
    prefill_chunk: a prompt is prefilled in blocks of at most this many tokens (bounds the memory).
    min_new_tokens: EOS cannot be drawn before a prompt has this many tokens (a chat model asked to
    continue plain text often puts its end-of-turn first, which would end the answer empty).
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate_from_ids: empty prompt (at least one token needed"
                         + (" after the prefix)" if prefix else ")"))
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"generate_from_ids: {len(seeds)} seeds for {len(prompts)} prompts")
    n = len(prompts)
    out: list[list[int]] = [[] for _ in prompts]
    finished = [False] * n
    if n == 0 or max_new_tokens <= 0:
        return (out, finished) if return_finished else out
    dev = model.device
    shared = model.shared_prefix(model.embed(torch.tensor([prefix], device=dev))) if prefix else None
    waiting = deque(range(n))                  # prompts not yet in a row, taken in input order
    B = min(batch_size, n)
    cache = model.new_row_cache(B, max(map(len, prompts)) + max_new_tokens, prefix=shared)
    row = [-1] * B                             # prompt in each row, -1: free
    gens: dict[int, torch.Generator] = {}
    logits = torch.empty(B, model.cfg.vocab_size, device=dev)              # next-token logits per busy row
    bar = tqdm(total=n, desc="generate", unit="prompt", disable=not progress, leave=False)

    def admit(rows: list[int]):
        """Waiting prompts into free rows, each prefilled by itself (in blocks of prefill_chunk
        tokens) through a view of its row: what a prompt's prefill computes does not depend on the
        prompts admitted with it."""
        for r in rows[:len(waiting)]:
            i = row[r] = waiting.popleft()
            g = gens[i] = torch.Generator(device=dev)
            g.manual_seed(seeds[i] if seeds is not None else row_seed(seed, i))
            view = cache.rows(r, r + 1)
            view.lengths.zero_()
            ids = torch.as_tensor(prompts[i], device=dev)[None]
            for c in range(0, ids.shape[1], prefill_chunk):
                h = model.hidden_states(model.embed(ids[:, c:c + prefill_chunk]), cache=view)
            logits[r] = model.logits(h[0, -1]).float()

    admit(list(range(B)))
    while True:
        busy = [r for r in range(B) if row[r] >= 0]
        if not busy:
            break
        if min_new_tokens and eos_id is not None:
            early = [r for r in busy if len(out[row[r]]) < min_new_tokens]
            if early:
                logits[early, eos_id] = float("-inf")
        toks = _pick(logits[busy], temperature, top_k, top_p, [gens[row[r]] for r in busy]).tolist()
        feed: dict[int, int] = {}                 # row -> its token for the next decode step
        for r, tk in zip(busy, toks):
            i = row[r]
            if tk == eos_id:
                finished[i] = True
            else:
                out[i].append(tk)
                finished[i] = stop is not None and bool(stop(out[i]))
            if finished[i] or len(out[i]) >= max_new_tokens:
                del gens[i]
                row[r] = -1
                bar.update(1)
            else:
                feed[r] = tk
        if not waiting and 4 * (B - len(feed)) >= B:
            # No prompt left for the free rows: once a quarter of the batch is idle, drop the idle
            # rows (a copy of the slots in use), so that they stop costing compute.
            kept = sorted(feed)
            sel = torch.tensor([r in feed for r in range(B)], device=dev)
            cache.keep_rows(sel)
            logits, row, B = logits[sel], [row[r] for r in kept], len(kept)
            feed = {j: feed[r] for j, r in enumerate(kept)}
            if not B:
                break
        if feed:
            step = torch.zeros(B, 1, dtype=torch.long)
            live = torch.zeros(B, 1, dtype=torch.bool)            # free rows ride along as padding
            for r, tk in feed.items():
                step[r, 0], live[r, 0] = tk, True
            go_on = sorted(feed)
            h = model.hidden_states(model.embed(step.to(dev)), live.to(dev), cache)
            logits[go_on] = model.logits(h[go_on, 0]).float()
        if waiting:
            admit([r for r in range(B) if row[r] < 0])
    bar.close()
    return (out, finished) if return_finished else out


# Stop strings

def stop_on(tok, stops: list[str], window: int = 12):
    """A `sample` stop callback: True once the last `window` tokens' text holds any stop string."""
    return lambda ids: any(s in tok.decode(ids[-window:]) for s in stops)


def cut_at(text: str, stops: list[str]) -> str:
    """The text up to the first stop string."""
    for s in stops:
        text = text.split(s, 1)[0]
    return text
