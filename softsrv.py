"""SoftSRV (DeSalvo et al., Sec. 2): a trained soft prompt P_θ(z) steers a frozen decoder H.

- E: the context encoder, z = E(x) = mean of a small frozen LM's final hidden states over x's tokens
  (read after a BOS when that LM expects one).
- P_θ: the SoftSRV embedding, one of three parameterizations, each `forward(z) -> [B, t, d]`:
  SoftPromptNP (Eq. 1), SoftPromptMP (Eq. 2), SoftPromptMC (Eq. 3).
- `softsrv_loss`: causal cross-entropy of x given P_θ(E(x)) as the ONLY prefix (the "reconstruction"
  objective), counted on x's tokens and one end-of-sequence token. H stays frozen.
- `prepend_bos`: the prefix H reads is [I(BOS); P_θ(z)] when H's tokenizer expects a BOS (Gemma),
  for the loss and for sampling alike; else P_θ(z).
Sampling x' ~ H(P_θ(z)) is sampling.py's `sample`, the one sampler of the project.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.distributed
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from data import atomic_write, fingerprint, load_examples, lock, read_json, read_jsonl, split_heldout
from dist import all_sum, append_in_rounds, init_distributed, rank0_first
from model import Transformer
from runtime import dtype_of
from sampling import sample
from weights import CACHE_DIR, DEFAULT_MODEL, load_model, load_tokenizer


# ----------------------------------------------------------------------------------------------
# E: the context encoder (Sec. 2, 3.3)

class ContextEncoder:
    """z = E(x): the mean of a frozen decoder's final hidden states over the real tokens of x (read
    after a BOS when that decoder expects one).

    Its d_e is the encoder's width (576 for the default model), far fewer numbers than x has, so
    reconstructing x from z stays lossy: the prompt must learn the distribution, not copy x.
    """

    def __init__(self, model: Transformer, tokenizer, max_tokens: int = 256, batch_size: int = 16):
        self.model, self.tokenizer = model, tokenizer
        self.max_tokens, self.batch_size = max_tokens, batch_size

    @property
    def dim(self) -> int:
        return self.model.cfg.d_model

    @torch.no_grad()
    def __call__(self, texts: list[str], progress: bool = False) -> torch.Tensor:
        """texts -> z [N, d_e] in fp32."""
        tok = self.tokenizer
        ids = [tok.with_bos(tok.encode(t)[: self.max_tokens] or [tok.eos_id]) for t in texts]
        # The BOS is context, not part of the mean: causal attention gives its position the same
        # hidden state for every x, so averaging it in would only add a constant weighted 1/(n+1),
        # a bias that depends on x's length and says nothing about x.
        first = int(tok.add_bos)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))   # similar lengths batch together
        out = torch.empty(len(ids), self.dim)
        dev = self.model.device
        for s in tqdm(range(0, len(order), self.batch_size), desc="E(x) contexts", disable=not progress,
                      leave=False):
            rows = order[s:s + self.batch_size]
            T = max(len(ids[i]) for i in rows)
            batch = torch.full((len(rows), T), self.tokenizer.pad_id, dtype=torch.long)
            mask = torch.zeros(len(rows), T, dtype=torch.bool)
            for b, i in enumerate(rows):
                batch[b, : len(ids[i])], mask[b, first: len(ids[i])] = torch.tensor(ids[i]), True
            batch, mask = batch.to(dev), mask.to(dev)
            # Right padding needs no attention mask (causal); the mean just skips the pad rows.
            h = self.model.hidden_states(self.model.embed(batch)).float()
            m = mask[..., None].float()
            out[rows] = ((h * m).sum(1) / m.sum(1)).cpu()
        return out


# ----------------------------------------------------------------------------------------------
# P_θ: the three parameterizations

def sample_vocab_embeddings(backbone: Transformer, n: int, generator: torch.Generator) -> torch.Tensor:
    """I(ids) of n random token ids (fp32, [n, d]): embed() and not raw table rows, so a prompt
    starts where embedded text lives (Gemma scales the table by sqrt(d), ~25x for Gemma 3 270M)."""
    idx = torch.randint(0, backbone.cfg.vocab_size, (n,), generator=generator)
    with torch.no_grad():
        return backbone.embed(idx.to(backbone.device)[None])[0].float().cpu()


class SoftPrompt(nn.Module):
    """What every P_θ shares: t soft tokens of width d, and the statistics that standardize z.

    z is standardized per dimension with the training contexts' mean and std (kept as buffers, so
    generation uses the same ones): raw mean-pooled hidden states have a few huge dimensions that
    would otherwise swamp the first layer of W_φ or the MLPs.
    """
    kind = ""

    def __init__(self, t: int, d: int, d_e: int):
        super().__init__()
        self.t, self.d, self.d_e = t, d, d_e
        self.register_buffer("z_mean", torch.zeros(d_e))
        self.register_buffer("z_std", torch.ones(d_e))

    def init_from_contexts(self, z: torch.Tensor, seed: int = 0):
        """Data-dependent initialization from the training contexts z [n, d_e] (before step 0)."""
        self.z_mean.copy_(z.mean(0))
        self.z_std.copy_(z.std(0).clamp(min=1e-6))

    def standardize(self, z: torch.Tensor) -> torch.Tensor:
        return (z.to(self.z_mean) - self.z_mean) / self.z_std

    def param_groups(self, decay: float) -> list[dict]:
        """AdamW parameter groups. `decay` is the weight decay of the parts of θ a prior pulls to
        zero; only SS_MP has one (its deviations, see SoftPromptMP), so NP and MC train with Adam."""
        return [{"params": list(self.parameters()), "weight_decay": 0.0}]


class SoftPromptNP(SoftPrompt):
    """SS_NP (Eq. 1): θ = P ∈ R^{t x d}; the context is ignored."""
    kind = "np"

    def __init__(self, t, d, d_e, init: torch.Tensor):
        super().__init__(t, d, d_e)
        self.P = nn.Parameter(init.clone())                                  # [t, d]

    def forward(self, z):
        return self.P.expand(z.shape[0], -1, -1)


class SoftPromptMP(SoftPrompt):
    """SS_MPk (Eq. 2): P_θ(z) = Σ_j w_j P_j with (w_1..w_k) = softmax(W_φ(z)).

    The bases are stored as their mean and their deviations from it, P_j = P̄ + D_j - mean_i D_i,
    so P_θ(z) = P̄ + Σ_j w_j (D_j - mean_i D_i). Same functions as Eq. 2, different optimization:
    with D = 0 it is NP exactly; Adam gives P̄ the whole batch's gradient, as NP's P gets, at the
    same rate, and the deviations only what the k modes want differently (what they all want
    cancels out of them). Stored as k free bases, every basis learns what all examples share from
    1/k of them. D alone is weight-decayed (`param_groups`): each basis fits its own mode's
    examples, and on a small target sample that overfits (lower training loss than NP, higher
    held-out loss), so the bases stay apart only where the data keeps pulling them apart.
    (docs/heldout_loss.md compares the variants tried.)
    """
    kind = "mp"

    def __init__(self, t, d, d_e, init: torch.Tensor, k: int = 2):
        super().__init__(t, d, d_e)
        self.k = k
        self.P_bar = nn.Parameter(init.clone())                              # [t, d], mean of the bases
        self.D = nn.Parameter(torch.zeros(k, t, d))                          # deviations (centered in use)
        self.W_phi = nn.Linear(d_e, k)
        nn.init.zeros_(self.W_phi.weight)      # replaced by the k-means routing of init_from_contexts
        nn.init.zeros_(self.W_phi.bias)

    def deviations(self) -> torch.Tensor:
        return self.D - self.D.mean(0)

    @property
    def P(self) -> torch.Tensor:
        """The k basis embeddings P_1..P_k of Eq. 2, [k, t, d]."""
        return self.P_bar + self.deviations()

    def init_from_contexts(self, z: torch.Tensor, seed: int = 0):
        """Start W_φ as a soft k-means assignment of the standardized contexts (the k "modes" of Sec. 2.2).

        Why: the bases start equal (D = 0), so with a uniform mix every D_j gets the same gradient,
        Adam moves them identically and MPk stays NP. Routing by cluster from step 0 gives each D_j
        the gradient of its own mode. softmax_j(-|x - c_j|^2 / τ) is linear in x up to a term shared
        by all j: W_j = 2 c_j / τ, b_j = -|c_j|^2 / τ. τ makes the median gap between the nearest
        and the second-nearest cluster 2 nats (about 0.88 / 0.12 for k = 2): routed, yet still soft.
        """
        super().init_from_contexts(z, seed)
        if len(z) < self.k:
            raise ValueError(f"--k {self.k}: needs at least {self.k} training examples, got {len(z)}")
        from sklearn.cluster import KMeans
        x = self.standardize(z).double().cpu()
        c = torch.from_numpy(KMeans(self.k, n_init=10, random_state=seed).fit(x.numpy()).cluster_centers_)
        d2 = torch.cdist(x, c).pow(2).sort(dim=1).values                   # [n, k] ascending
        tau = ((d2[:, 1] - d2[:, 0]).median() / 2).clamp(min=1e-6)
        with torch.no_grad():
            self.W_phi.weight.copy_(2 * c / tau)
            self.W_phi.bias.copy_(-c.pow(2).sum(1) / tau)

    def param_groups(self, decay: float) -> list[dict]:
        return [{"params": [self.P_bar, *self.W_phi.parameters()], "weight_decay": 0.0},
                {"params": [self.D], "weight_decay": decay}]                # pulls P_j toward P̄

    def forward(self, z):
        w = F.softmax(self.W_phi(self.standardize(z)), dim=-1)               # [B, k]
        return self.P_bar + torch.einsum("bk,ktd->btd", w, self.deviations())


class SoftPromptMC(SoftPrompt):
    """SS_MC (Eq. 3): P_θ(z) = [F_φ1(z), ..., F_φt(z)], t separate 3-layer MLPs R^{d_e} -> R^d.

    The t MLPs are stored as stacked weights ([t, in, out]) and run as one batched einsum, which is
    the same as t separate nn.Sequential modules, just without a Python loop over soft tokens.
    """
    kind = "mc"

    def __init__(self, t, d, d_e, init: torch.Tensor, hidden: int = 128, layers: int = 3):
        super().__init__(t, d, d_e)
        self.hidden, self.layers = hidden, layers
        dims = [d_e] + [hidden] * (layers - 1) + [d]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == layers - 1
            # The last layer starts tiny, with its bias at sampled vocabulary embeddings: at step 0
            # every F_φi(z) sits on the token-embedding manifold H was trained on (prompts far from
            # it are a known cause of prompt tuning that does not train), and z's influence grows
            # as training finds it useful.
            std = 0.02 * a ** -0.5 if last else a ** -0.5
            self.weights.append(nn.Parameter(torch.randn(t, a, b) * std))
            self.biases.append(nn.Parameter(init.clone() if last else torch.zeros(t, b)))

    def forward(self, z):
        h = self.standardize(z)[:, None, :].expand(-1, self.t, -1)            # [B, t, d_e]
        for i, (W, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.einsum("bti,tio->bto", h, W) + b
            if i < self.layers - 1:
                h = F.gelu(h)
        return h                                                              # [B, t, d]


def build_soft_prompt(kind: str, backbone: Transformer, d_e: int, t: int, k: int = 2,
                      hidden: int = 128, seed: int = 0) -> SoftPrompt:
    """A fresh P_θ whose soft tokens start at sampled vocabulary embeddings of the backbone."""
    g = torch.Generator().manual_seed(seed)
    d = backbone.cfg.d_model
    if kind == "np":
        return SoftPromptNP(t, d, d_e, sample_vocab_embeddings(backbone, t, g))
    if kind == "mp":
        # P̄ starts where NP's P does and every D_j at zero: P_θ(z) starts as NP's prompt
        # for every z, on the embedding manifold, and the context can only be added by training.
        return SoftPromptMP(t, d, d_e, sample_vocab_embeddings(backbone, t, g), k=k)
    if kind == "mc":
        torch.manual_seed(seed)  # the MLP weights draw from the global generator
        return SoftPromptMC(t, d, d_e, sample_vocab_embeddings(backbone, t, g), hidden=hidden)
    raise ValueError(f"--param: unknown parameterization '{kind}' (np, mp, mc)")


# ----------------------------------------------------------------------------------------------
# The objective (Sec. 2): argmin_θ Σ_i ℓ(H(P_θ(E(x_i))), x_i)

def pad_targets(token_lists: list[list[int]], eos_id: int, max_tokens: int, device) -> torch.Tensor:
    """[B, L] ids of x followed by one EOS, right-padded with -100 (ignored by the loss)."""
    rows = [ids[:max_tokens] + [eos_id] for ids in token_lists]
    out = torch.full((len(rows), max(map(len, rows))), -100, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, : len(r)] = torch.tensor(r)
    return out.to(device)


def prepend_bos(backbone: Transformer, tok, prompts: torch.Tensor) -> torch.Tensor:
    """The prefix H reads before x: [I(BOS); P_θ(z)] when H's tokenizer expects a BOS (`tok.add_bos`:
    Gemma, whose text always starts with one and which models text far worse without it), else
    P_θ(z) as it is. Every soft prompt that reaches H goes through it: the loss, the held-out loss and
    sampling, so the prompt is trained and sampled at the same positions."""
    if not tok.add_bos:
        return prompts
    with torch.no_grad():                                   # a constant: H stays frozen
        bos = backbone.embed(torch.tensor([[tok.bos_id]], device=backbone.device)).to(prompts)
    return torch.cat([bos.expand(prompts.shape[0], -1, -1), prompts], dim=1)


def softsrv_loss(backbone: Transformer, prompts: torch.Tensor, targets: torch.Tensor,
                 reduction: str = "mean") -> torch.Tensor:
    """ℓ(H(P), x): next-token cross-entropy of x (and its EOS) with the soft prompt as the only prefix
    (after the BOS, for a model that wants one).

    prompts [B, t, d] (any float dtype; cast to H's), the whole prefix (from `prepend_bos`), targets
    [B, L] from `pad_targets`; only x and its EOS are scored, never the prefix. The input
    is [P; I(x_1..x_{L-1})]: the last soft token predicts x_1, x_j predicts x_{j+1}, x_L predicts
    EOS. Right padding needs no attention mask, since no real token attends to the pads after it.
    With reduction="sum" returns (summed loss, token count) for exact per-token averages.
    """
    t = prompts.shape[1]
    text = backbone.embed(targets[:, :-1].clamp(min=0))
    h = backbone.hidden_states(torch.cat([prompts.to(text.dtype), text], dim=1))
    logits = backbone.logits(h[:, t - 1:]).float()                      # only where x is predicted
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    n = (targets != -100).sum()
    return (loss, n) if reduction == "sum" else loss / n


# ----------------------------------------------------------------------------------------------
# Context vectors, computed once per (encoder, dataset) and cached

def context_vectors(encoder: ContextEncoder, encoder_name: str, texts: list[str], data_fp: str,
                    progress: bool = True) -> torch.Tensor:
    """z_i = E(x_i) for every text, read from the cache when this encoder already embedded this data."""
    bos = "|bos" if encoder.tokenizer.add_bos else ""        # z read after a BOS is another z
    what = f"{encoder_name}|{encoder.max_tokens}|{encoder.model.dtype}|{data_fp}{bos}"
    key = hashlib.sha256(what.encode()).hexdigest()[:20]
    path = CACHE_DIR / "contexts" / f"{key}.safetensors"
    if path.exists():
        try:
            z = load_file(str(path))["z"]
            if z.shape[0] == len(texts):
                return z
        except Exception:       # a damaged cache entry is only a cache miss: computed and rewritten
            pass
    z = encoder(texts, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: save_file({"z": z.contiguous()}, str(p)))
    return z


# ----------------------------------------------------------------------------------------------
# Checkpoints: θ (safetensors) + training state (safetensors) + everything else (JSON)

CKPT_THETA, CKPT_STATE, CKPT_CONFIG = "theta.safetensors", "train_state.safetensors", "config.json"


def save_checkpoint(out_dir, prompt: SoftPrompt, config: dict, step: int,
                    optimizer: torch.optim.Optimizer | None = None):
    """Write θ, the optimizer state, then the JSON last; each file atomically. All three carry the
    step, so a crash between two renames is detected on load instead of resuming a torn state."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"step": str(step)}
    theta = {k: v.detach().contiguous().cpu() for k, v in prompt.state_dict().items()}
    atomic_write(out / CKPT_THETA, lambda p: save_file(theta, str(p), metadata=meta))
    opt_groups = save_optimizer_state(out, optimizer, step) if optimizer is not None else None
    record = {**config, "step": step, "optimizer_param_groups": opt_groups,
              "soft_prompt": {"kind": prompt.kind, "t": prompt.t, "d": prompt.d, "d_e": prompt.d_e,
                              "k": getattr(prompt, "k", None), "hidden": getattr(prompt, "hidden", None)}}
    atomic_write(out / CKPT_CONFIG, lambda p: p.write_text(json.dumps(record, indent=2)))


def save_optimizer_state(out_dir, optimizer: torch.optim.Optimizer, step: int) -> list[dict]:
    """The optimizer's tensors as safetensors (tagged with the step); returns its param_groups,
    which go into the checkpoint's JSON (load_optimizer_state reads both)."""
    sd = optimizer.state_dict()
    state = {f"{i}.{k}": v.contiguous().cpu() for i, s in sd["state"].items() for k, v in s.items()}
    atomic_write(Path(out_dir) / CKPT_STATE, lambda p: save_file(state, str(p), metadata={"step": str(step)}))
    return sd["param_groups"]


def _read_tensors(path: Path, step: int) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's safetensors file, checked to be from the step its JSON names.
    A missing, truncated or garbled file is one ValueError naming it."""
    try:
        with safe_open(str(path), "pt") as f:
            saved_step = int((f.metadata() or {}).get("step", -1))
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise ValueError(f"{path}: missing (the checkpoint is incomplete); delete the folder or train again") from None
    except Exception as e:      # safetensors raises its own error type for a truncated or garbled file
        raise ValueError(f"{path}: unreadable or truncated safetensors file ({str(e).splitlines()[0]}); "
                         f"delete the folder or train again") from None
    if saved_step != step:
        raise ValueError(f"{path}: written at another step than {CKPT_CONFIG} (interrupted save); "
                         f"delete the folder or train again")
    return tensors


def _read_record(ckpt_dir) -> dict:
    """A checkpoint's JSON record, with the keys load_checkpoint needs checked (one line naming
    the file and the key otherwise)."""
    path = Path(ckpt_dir) / CKPT_CONFIG
    if not path.exists():
        raise ValueError(f"{Path(ckpt_dir)}: not a SoftSRV checkpoint (no {CKPT_CONFIG}; "
                         f"train one with train.py --out {ckpt_dir})")
    record = read_json(path)
    if not isinstance(record, dict):
        raise ValueError(f"{path}: a JSON {type(record).__name__}, not a checkpoint record; "
                         f"delete the folder or train again")
    missing = [k for k in ("step", "config", "method", "data_fingerprint", "soft_prompt") if k not in record]
    sp = record.get("soft_prompt")
    if isinstance(sp, dict):
        missing += [f"soft_prompt.{k}" for k in ("kind", "t", "d", "d_e")
                    + {"mp": ("k",), "mc": ("hidden",)}.get(sp.get("kind"), ()) if k not in sp]
    elif sp is not None:
        missing.append("soft_prompt (an object)")
    if missing:
        raise ValueError(f"{path}: damaged checkpoint record, missing {', '.join(missing)}; "
                         f"delete the folder or train again")
    if sp["kind"] not in ("np", "mp", "mc"):
        raise ValueError(f"{path}: unknown soft prompt kind {sp['kind']!r} (np, mp, mc)")
    return record


def load_checkpoint(ckpt_dir) -> tuple[SoftPrompt, dict]:
    """Rebuild P_θ from a checkpoint folder; returns it (fp32, on the CPU) and the JSON record."""
    ckpt = Path(ckpt_dir)
    record = _read_record(ckpt)
    sp = record["soft_prompt"]
    zeros = torch.zeros(sp["t"], sp["d"])
    cls = {"np": SoftPromptNP, "mp": SoftPromptMP, "mc": SoftPromptMC}[sp["kind"]]
    kw = {"mp": {"k": sp["k"]}, "mc": {"hidden": sp["hidden"]}}.get(sp["kind"], {})
    prompt = cls(sp["t"], sp["d"], sp["d_e"], zeros, **kw)
    try:
        prompt.load_state_dict(_read_tensors(ckpt / CKPT_THETA, record["step"]))
    except RuntimeError as e:   # e.g. a checkpoint of an older SS_MP layout
        raise ValueError(f"{ckpt / CKPT_THETA}: does not match {sp['kind'].upper()} with t={sp['t']} "
                         f"({str(e).splitlines()[1].strip()}); train it again") from None
    return prompt, record


def theta_hash(ckpt_dir) -> str:
    """Short sha256 of a checkpoint's θ file: which weights wrote a file of samples."""
    h = hashlib.sha256()
    with open(Path(ckpt_dir) / CKPT_THETA, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def load_optimizer_state(ckpt_dir, optimizer: torch.optim.Optimizer, record: dict):
    """Restore the optimizer state saved beside θ (for --resume)."""
    path = Path(ckpt_dir) / CKPT_STATE
    state: dict = {}
    for key, v in _read_tensors(path, record["step"]).items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    if not isinstance(record.get("optimizer_param_groups"), list):
        raise ValueError(f"{Path(ckpt_dir) / CKPT_CONFIG}: no optimizer_param_groups to resume from; train again")
    try:
        optimizer.load_state_dict({"state": state, "param_groups": record["optimizer_param_groups"]})
    except ValueError as e:     # e.g. an SS_MP checkpoint from before its deviations had their own group
        raise ValueError(f"{path}: optimizer state does not fit this run ({e}); train it again") from None


def lr_at(cfg, step: int) -> float:
    """The learning rate at a step of either trainer (cfg has lr, warmup, steps): linear warm-up,
    then cosine decay to a tenth of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


# ----------------------------------------------------------------------------------------------
# Training configuration (train.py trains with it; generate.py reads it back from a checkpoint)

# Paper (Sec. 3.3): t = 128, 20K steps, Adam, lr 5e-6, MC 3x128 MLPs, MP k = 2. The paper
# does not give the batch size; 16 is assumed. The cpu preset changes, and why:
# - prompt_len 16 instead of 128: every soft token is paid for on every step by a 2-core CPU; 16
#   already reaches a clearly lower held-out loss (docs/heldout_loss.md).
# - 250 steps of batch 8 instead of 20K: the whole job must fit in minutes on a CPU (docs/performance.md).
# - lr 2.4e-2 (NP, MP) and 3e-3 (MC) instead of 5e-6: with 250 steps, 5e-6 would not move θ at all.
#   Each is the best of a sweep on seed 0 (docs/heldout_loss.md): NP's held-out loss fell from 3e-3 up to 2.4e-2,
#   rose at 4.8e-2; MC's MLPs amplify updates, so it wants less.
# - max_tokens 128: GSM8K questions are almost all shorter, and it bounds a step's cost.
# - mp_decay 3 instead of none: on the 889 offline questions MP2's bases overfit their modes (see
#   SoftPromptMP); best of 0/1/3 on seed 0, and ahead of NP on seeds 1 and 2 as well (docs/heldout_loss.md).
PRESETS = {
    "cpu": dict(prompt_len=16, steps=250, batch_size=8, lr={"np": 2.4e-2, "mp": 2.4e-2, "mc": 3e-3},
                max_tokens=128, eval_every=50, warmup=10, mp_decay=3.0),
    "paper": dict(prompt_len=128, steps=20_000, batch_size=16, lr={"np": 5e-6, "mp": 5e-6, "mc": 5e-6},
                  max_tokens=512, eval_every=1000, warmup=0, mp_decay=0.0),
}


@dataclass
class TrainConfig:
    param: str = "mc"                 # np | mp | mc
    k: int = 2                        # MPk: number of basis embeddings
    mp_decay: float = 0.0             # MPk: AdamW weight decay of the deviations D_j - mean_i D_i
    prompt_len: int = 16              # t, soft tokens
    hidden: int = 128                 # MC: hidden width of each 3-layer MLP
    steps: int = 250
    lr: float = 1e-3
    warmup: int = 10
    batch_size: int = 8
    max_tokens: int = 128             # target tokens per example (longer ones are cut)
    data: str = "gsm8k"
    field: str | None = None
    split: str = "train"
    n_heldout: int = 100
    model: str = DEFAULT_MODEL
    embed_model: str = DEFAULT_MODEL
    out: str = "out/ss_mc"
    seed: int = 0
    eval_every: int = 50
    dtype: str = "auto"
    preset: str = "cpu"


def train_config(param: str = "mc", preset: str = "cpu", **given) -> TrainConfig:
    """A TrainConfig from a preset (PRESETS) and the settings given explicitly; a setting given as None
    takes the preset's value, and the lr the preset's for this parameterization."""
    values = {k: v for k, v in given.items() if v is not None}
    base = {**PRESETS[preset], "lr": PRESETS[preset]["lr"][param]}
    cfg = TrainConfig(param=param, preset=preset, **{**base, **values})
    if "embed_model" not in values:
        cfg.embed_model = cfg.model                 # E is H unless said otherwise
    if param != "mp":
        cfg.mp_decay = 0.0      # nothing of NP's or MC's θ is decayed; recorded as such
    return cfg


def load_training_data(cfg: TrainConfig):
    """The target sample, cut into (train, held-out) exactly as every run with this config cuts it."""
    examples = load_examples(cfg.data, split=cfg.split, field=cfg.field)
    if len(examples) < cfg.n_heldout + cfg.batch_size:
        raise ValueError(f"--data {cfg.data}: {len(examples)} examples, fewer than --n-heldout "
                         f"{cfg.n_heldout} + --batch-size {cfg.batch_size}")
    return split_heldout(examples, cfg.n_heldout, seed=cfg.seed)


# ----------------------------------------------------------------------------------------------
# Training P_θ (Sec. 3.3, step 1): z_i = E(x_i) computed once and cached; each step draws a batch,
# builds P_θ(z_i) and minimizes the cross-entropy of x_i given it as the only prefix of the frozen H.

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


def load_backbone_and_contexts(cfg: TrainConfig, examples: list, rank: int, world: int, device):
    """The frozen H with its tokenizer, E, and z_i = E(x_i) for every example (cached on disk by
    encoder and data). E is the same copy of the weights as H unless cfg.embed_model names another."""
    with rank0_first(rank, world):               # a first run converts the model and embeds the data once
        backbone = load_model(cfg.model, dtype=dtype_of(cfg.dtype, device), device=device)
        tok = load_tokenizer(cfg.model)
        if cfg.embed_model == cfg.model:
            enc_model, enc_tok = backbone, tok
        else:
            enc_model = load_model(cfg.embed_model, dtype=dtype_of(cfg.dtype, device), device=device)
            enc_tok = load_tokenizer(cfg.embed_model)
        encoder = ContextEncoder(enc_model, enc_tok)
        z = context_vectors(encoder, cfg.embed_model, [e.text for e in examples], fingerprint(examples))
    return backbone, tok, encoder, z


def start_or_resume(cfg: TrainConfig, record: dict, resume: bool, backbone, encoder, z_train, device, log):
    """(P_θ, its optimizer, the step to start at, the held-out history so far): a new P_θ initialized
    from the train contexts, or the checkpoint in cfg.out when resuming (refused if it was trained
    with other settings or data)."""
    if not resume:
        prompt = build_soft_prompt(cfg.param, backbone, encoder.dim, cfg.prompt_len, k=cfg.k, hidden=cfg.hidden,
                                   seed=cfg.seed).to(device)
        prompt.init_from_contexts(z_train.to(device), seed=cfg.seed)
        return prompt, make_optimizer(prompt, cfg), 0, []
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
    log(f"resuming {cfg.out} at step {saved['step']}/{cfg.steps}")
    return prompt, opt, saved["step"], saved.get("history", [])


def train_step(backbone, tok, ddp, opt, z_train, ids_train, idx: list[int], cfg: TrainConfig, lr: float,
               world: int, device) -> tuple[float, int]:
    """One AdamW step on Eq. 1's loss for this rank's share of a batch: [BOS; P_θ(z_i)] (BOS on
    Gemma only) then x_i, scored on x_i and its EOS. Returns (summed loss, target tokens) of this rank.
    Under torchrun the summed loss over the GLOBAL token count, times world (DDP averages), gives
    exactly the one-process gradient."""
    for g in opt.param_groups:
        g["lr"] = lr
    targets = pad_targets([ids_train[i] for i in idx], tok.eos_id, cfg.max_tokens, device)
    prefix = prepend_bos(backbone, tok, ddp(z_train[idx].to(device)))
    loss_sum, n = softsrv_loss(backbone, prefix, targets, "sum")
    loss = loss_sum / n if world == 1 else loss_sum * (world / all_sum(world, n.item())[0])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss_sum.item(), n.item()


def train(cfg: TrainConfig, resume: bool = False, show_samples: int = 3) -> dict:
    """Minimize Eq. 1's reconstruction loss over θ (H and E frozen), evaluating the held-out loss every
    eval_every steps and saving a checkpoint there; resume=True continues the run in cfg.out."""
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
    backbone, tok, encoder, z = load_backbone_and_contexts(cfg, train_ex + held_ex, rank, world, device)
    z_train, z_held = z[: len(train_ex)], z[len(train_ex):]
    ids_train = [tok.encode(e.text) for e in train_ex]
    ids_held = [tok.encode(e.text) for e in held_ex]
    lengths = [min(len(ids), cfg.max_tokens) for ids in ids_train]
    bytes_held = sum(len(tok.decode(ids[:cfg.max_tokens]).encode("utf-8")) for ids in ids_held)

    record = {"config": asdict(cfg), "backbone": cfg.model, "encoder": cfg.embed_model,
              "data_fingerprint": fingerprint(train_ex), "n_train": len(train_ex),
              "n_heldout": len(held_ex), "method": f"SS_{cfg.param.upper()}" + (str(cfg.k) if cfg.param == "mp" else "")}
    prompt, opt, start, history = start_or_resume(cfg, record, resume, backbone, encoder, z_train, device, log)
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

    if start == 0:
        evaluate(0)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=record["method"], dynamic_ncols=True,
               disable=rank != 0)
    t0, seen = time.time(), 0
    for step in bar:
        idx = batch_indices(cfg, step, lengths)[rank::world]      # each rank: every world-th example
        loss_sum, n = train_step(backbone, tok, ddp, opt, z_train, ids_train, idx, cfg, lr_at(cfg, step),
                                 world, device)
        seen += len(idx) * (max(lengths[i] for i in idx) + 1 + cfg.prompt_len) * world   # x, its EOS, P_θ(z)
        if rank == 0:
            bar.set_postfix(loss=f"{loss_sum / n:.3f}", lr=f"{lr_at(cfg, step):.1e}",
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


# ----------------------------------------------------------------------------------------------
# Sampling synthetic examples (Sec. 3.3, step 2): x' ~ H(P_θ(E(x_i))), round-robin over the train fold

def generate(ckpt: str, n: int, out: str | None = None, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 0, batch_size: int = 16, max_new_tokens: int | None = None, seed: int = 0,
             dtype: str | None = None) -> Path:
    """n samples x' ~ H(P_θ(z)) from a checkpoint into a JSONL (generate.py's docstring: the contexts,
    the records, resuming and torchrun)."""
    prompt, record = load_checkpoint(ckpt)
    cfg = TrainConfig(**record["config"])
    out_path = Path(out) if out else Path(ckpt) / "samples.jsonl"
    max_new_tokens = cfg.max_tokens if max_new_tokens is None else max_new_tokens
    rank, world, device = init_distributed()
    # The file belongs to one process (rank 0 of one torchrun job) at a time: two appending at once
    # would write every sample twice. Rank 0's refusal reaches the other ranks as the same line.
    with rank0_first(rank, world):
        held = lock(out_path.parent / f".{out_path.name}.lock", str(out_path)) if rank == 0 else nullcontext()
    with held:
        # Which weights and settings wrote each sample: an existing file is continued only by the same
        # θ (its hash, so a retrained or other checkpoint at the same path is caught) and settings.
        settings = {"checkpoint": str(Path(ckpt).resolve()), "theta": theta_hash(ckpt), "step": record["step"],
                    "temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed,
                    "batch_size": batch_size, "max_new_tokens": max_new_tokens}
        done = set()
        if out_path.exists():
            for r in read_jsonl(out_path, repair=True):
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
        if fingerprint(train_ex) != record["data_fingerprint"]:
            raise ValueError(f"--data {cfg.data}: not the data {ckpt} was trained on (fingerprint changed)")
        with rank0_first(rank, world):     # a first run converts the model and embeds the data once
            backbone = load_model(cfg.model, dtype=dtype_of(dtype or cfg.dtype, device), device=device)
            tok = load_tokenizer(cfg.model)
            enc_model = backbone if cfg.embed_model == cfg.model else load_model(cfg.embed_model, dtype=backbone.dtype, device=device)
            encoder = ContextEncoder(enc_model, tok if enc_model is backbone else load_tokenizer(cfg.embed_model))
            all_ex = train_ex + held_ex    # the same list train.py embedded, so the cached z is reused
            z = context_vectors(encoder, cfg.embed_model, [e.text for e in all_ex], fingerprint(all_ex))[: len(train_ex)]
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
