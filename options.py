"""The range of every numeric option, checked once here and shared by every CLI that takes it.

Each checker is an argparse `type=`: a value out of range ends the command at parse time, before
anything is loaded or written, with argparse's one line naming the option, e.g.
`pipeline.py: error: argument --top-p: must be > 0 and <= 1, got 0`, and exit status 2.
An option means the same thing in every script, so it is checked by the same function
(`--temperature` in generate.py and pipeline.py, `--lr` in train.py and finetune.py, ...).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path


def _number(kind, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _checker(kind, ok, rule: str, name: str):
    def check(text: str):
        value = _number(kind, text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    check.__name__ = name
    return check


# Counts: samples, steps, batch sizes, tokens, clusters, checkpoints, held-out examples (0 of
# those would divide by zero or silently mean "the default").
count = _checker(int, lambda v: v >= 1, "at least 1", "count")
# Counts where 0 means "none": warm-up steps, few-shot examples, top-k (0 = off).
count0 = _checker(int, lambda v: v >= 0, "at least 0", "count0")
# Seeds: numpy's generators (the cluster subsample, MAUVE's k-means) take no negative seed.
seed = _checker(int, lambda v: v >= 0, "at least 0", "seed")
# Sampling temperature: 0 is greedy; a negative one would divide the logits by a negative number and
# sample the least likely tokens.
temperature = _checker(float, lambda v: v >= 0, "at least 0 (0 = greedy)", "temperature")
# Nucleus mass: 1 keeps every token (off); 0 or less keeps none.
top_p = _checker(float, lambda v: 0 < v <= 1, "> 0 and <= 1", "top_p")
# Learning rates and epochs: 0 trains nothing.
positive = _checker(float, lambda v: v > 0, "> 0", "positive")
# Multiples that must be at least one: the answer step's attempts per wanted pair.
at_least_one = _checker(float, lambda v: v >= 1, "at least 1", "at_least_one")
# Weight decays.
nonneg = _checker(float, lambda v: v >= 0, "at least 0", "nonneg")


def path(text: str) -> str:
    """A file or folder given on the command line, made absolute: what a run records must still
    name the same file when read from another directory."""
    return str(Path(text).expanduser().resolve())


def data_source(registered):
    """--data: a registered dataset name as it is; a file (one that exists, or a name with a
    directory or an extension) made absolute. Anything else stays as typed, so a mistyped dataset
    name is reported as one."""
    def check(text: str) -> str:
        p = Path(text).expanduser()
        looks_like_file = p.exists() or len(p.parts) > 1 or "." in p.name
        return path(text) if text not in registered and looks_like_file else text
    check.__name__ = "data"
    return check


def model(text: str) -> str:
    """--model and its kin: a local folder or .gguf file made absolute (as `path`); a registered
    name or a hub id as it is."""
    return path(text) if Path(text).expanduser().exists() else text
