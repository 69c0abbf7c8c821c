"""The one sampler's continuous batching (sampling.generate_from_ids) on the tiny model in fp32: greedy
equals decoding each prompt alone, a prompt's sampled tokens do not depend on its batch, and a shared
prefix computed once gives the tokens of the whole prompts."""
import pytest
import torch

from conftest import QUESTIONS
from sampling import generate_from_ids, row_seed, sample, split_common_prefix


@pytest.fixture(scope="module")
def prompts(tiny_lm):
    _, tok = tiny_lm
    return [tok.encode(q) for q in QUESTIONS[:7]] + [tok.encode("x")]


def alone(model, p, n, eos=None, stop=None):
    """Greedy decoding of one prompt by itself (the batch-of-one KV-cache path of `sample`)."""
    return sample(model, model.embed(torch.tensor([p])), n, temperature=0, eos_id=eos, stop=stop)[0]


def common_eos(model, prompts, n):
    """A token that ends several prompts' greedy decodes early and at different steps, so rows end
    at different times and waiting prompts take their places."""
    free = [alone(model, p, n) for p in prompts]
    counts = {}
    for f in free:
        for t in set(f[1:n - 2]):
            counts[t] = counts.get(t, 0) + 1
    return max(counts, key=counts.get), free


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_greedy_equals_each_prompt_alone(tiny_lm, prompts, batch_size):
    model, _ = tiny_lm
    eos, _ = common_eos(model, prompts, 12)
    want = [alone(model, p, 12, eos) for p in prompts]
    got, finished = generate_from_ids(model, prompts, 12, eos_id=eos, batch_size=batch_size, return_finished=True)
    assert got == want
    assert finished == [len(w) < 12 for w in want]                      # EOS came before the cap
    assert 0 < sum(len(w) < 12 for w in want) < len(prompts)           # rows did end early: refills happened


def test_finished_says_which_prompts_ended_before_the_cap(tiny_lm, prompts):
    model, _ = tiny_lm
    eos, free = common_eos(model, prompts, 10)
    target = free[1][3]
    stop = lambda ids: ids[-1] == target
    got, finished = generate_from_ids(model, prompts, 10, eos_id=eos, stop=stop, batch_size=3, return_finished=True)
    for p, g, f, full in zip(prompts, got, finished, free):
        assert g == alone(model, p, 10, eos, stop)
        ends = [k for k, t in enumerate(full) if t == eos or t == target]
        assert f == bool(ends)                          # EOS or the stop rule came before the cap
        if ends and full[ends[0]] == eos:
            assert g == full[:ends[0]]                  # EOS is not in the output
        elif ends:
            assert g == full[:ends[0] + 1]              # the stop rule keeps its last token
        else:
            assert g == full
    assert generate_from_ids(model, prompts, 10, eos_id=eos, stop=stop, batch_size=3) == got



def test_min_new_tokens_keeps_eos_from_ending_a_prompt_early(tiny_lm, prompts):
    # EOS = the first greedy token of prompt 0, so without the floor that prompt ends empty
    model, _ = tiny_lm
    first = alone(model, prompts[0], 1)[0]
    got = generate_from_ids(model, prompts, 6, eos_id=first, batch_size=3)
    assert got[0] == []
    got = generate_from_ids(model, prompts, 6, eos_id=first, batch_size=3, min_new_tokens=2)
    assert all(len(g) >= 2 and first not in g[:2] for g in got)      # no EOS among the first two
    assert got[0][0] != first                        # prompt 0 goes on with its runner-up token

def test_sampled_tokens_do_not_depend_on_the_batch(tiny_lm, prompts):
    model, _ = tiny_lm
    kw = dict(temperature=1.0, top_p=0.95, seed=4)
    eos, _ = common_eos(model, prompts, 16)
    runs = [generate_from_ids(model, prompts, 16, eos_id=eos, batch_size=b, **kw) for b in (1, 2, 5, 16)]
    assert all(r == runs[0] for r in runs[1:])
    # prompt i alone, with its own seed (the one it gets as index i of the full call)
    for i in (0, 3, 7):
        assert generate_from_ids(model, [prompts[i]], 16, eos_id=eos, seeds=[row_seed(4, i)], **kw)[0] == runs[0][i]
    # other prompts in the batch, in another order: same tokens for the same seeds
    order = [5, 0, 2]
    sub = generate_from_ids(model, [prompts[i] for i in order], 16, eos_id=eos, batch_size=2,
                            seeds=[row_seed(4, i) for i in order], **kw)
    assert sub == [runs[0][i] for i in order]
    assert generate_from_ids(model, prompts, 16, eos_id=eos, batch_size=3, **{**kw, "seed": 5}) != runs[0]


def test_shared_prefix_gives_the_tokens_of_the_whole_prompts(tiny_lm):
    model, tok = tiny_lm
    shots = "".join(f"Question: {q}\nAnswer: 42\n\n" for q in QUESTIONS[:3])
    whole = [tok.encode(shots + f"Question: {q}\nAnswer:") for q in QUESTIONS[3:9]]
    prefix, rest = split_common_prefix(whole)
    assert len(prefix) > 60 and all(prefix + r == w for r, w in zip(rest, whole))
    greedy = generate_from_ids(model, rest, 10, eos_id=None, batch_size=4, prefix=prefix)
    assert greedy == [alone(model, w, 10) for w in whole]
    # sampled: the prefix's attention is summed in another order than the whole prompt's, so the
    # last bits differ from the run without it; with it, a prompt's tokens still ignore the batch
    kw = dict(temperature=1.0, seed=2, prefix=prefix)
    assert (generate_from_ids(model, rest, 10, eos_id=None, batch_size=4, **kw)
            == generate_from_ids(model, rest, 10, eos_id=None, batch_size=1, **kw))
    with pytest.raises(ValueError, match="after the prefix"):
        generate_from_ids(model, [rest[0], []], 4, eos_id=None, prefix=prefix)


def test_split_common_prefix():
    assert split_common_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == ([1, 2], [[3, 4], [5], [3]])
    assert split_common_prefix([[1, 2], [1, 2]]) == ([1], [[2], [2]])          # each keeps a token
    assert split_common_prefix([[7, 1], [8, 1]]) == ([], [[7, 1], [8, 1]])
    assert split_common_prefix([]) == ([], [])


def test_edge_cases(tiny_lm, prompts):
    model, _ = tiny_lm
    assert generate_from_ids(model, [], 5, eos_id=None) == []
    assert generate_from_ids(model, prompts[:2], 0, eos_id=None, return_finished=True) == ([[], []], [False, False])
    with pytest.raises(ValueError, match="empty prompt"):
        generate_from_ids(model, [[]], 5, eos_id=None)
    with pytest.raises(ValueError, match="seeds"):
        generate_from_ids(model, prompts[:2], 5, eos_id=None, seeds=[1])


def test_gsm8k_scores_the_same_with_the_shared_prefix(tiny_lm, monkeypatch):
    """eval.py's k-shot GSM8K prefills the shots once (split at the token level): same records as
    the whole prompts decoded row by row."""
    import data
    import tasks
    model, tok = tiny_lm
    items, shots = data.load_examples("gsm8k", "test", limit=3), data.load_examples("gsm8k", "train", limit=2)
    seen = []
    real = tasks.generate_from_ids
    def short(model, prompts, max_new, *a, **k):            # 256 tokens a question is slow on a busy CPU
        seen.append(len(k["prefix"]))
        return real(model, prompts, 32, *a, **k)
    monkeypatch.setattr(tasks, "generate_from_ids", short)
    shared = tasks.run_gsm8k(model, tok, items, shots, 2)
    monkeypatch.setattr(tasks, "split_common_prefix", lambda prompts: ([], prompts))
    whole = tasks.run_gsm8k(model, tok, items, shots, 2)
    assert seen[0] > 100 and seen[1] == 0                  # the shots were shared, then not
    assert shared == whole
