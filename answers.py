"""Step 3 of the pipeline (Sec. 3.3, Appendix C Fig. 9): answers for the synthetic questions, and the
gates that keep only answers a student can learn from (SPEC §11).

Formats (`--answer-format`):
- `as-is`, the paper's: SoftSRV gives the answerer the question alone as a user turn of its chat
  format; PT and PT_SR give it Fig. 9's answer template as the user turn.
- `fewshot`: every method the same k-shot prompt built from training examples, in the target's own
  format ("Question: ...\\nAnswer: ...", GSM8K reasoning ending in `#### N`, an MBPP function, a
  BoolQ true/false), so that arms differ only in their questions.

Gates: an answer that fails one is dropped and counted, never trained on:
- `unfinished`: no end of turn (or, few-shot, the next "Question:") before the token cap, so the
  text was cut mid-sentence;
- `loop`: some span of LOOP_WORDS words occurs LOOP_TIMES times or more (a 135M answerer repeats
  "15 x 2 = 30 miles" until the cap);
- `no_final_answer` (GSM8K: no number to extract), `no_function` (MBPP: the code does not parse or
  defines no function), `no_majority` (GSM8K self-consistency: no strict majority among the k final
  answers), `empty`.
BoolQ labels are never generated: the answerer's probabilities of true vs false decide.
"""
from __future__ import annotations

import ast
import re
from collections import Counter
from dataclasses import dataclass

import torch

import data
from tasks import choice_logprobs, gsm8k_clean, gsm8k_extract
from sampling import cut_at, generate_from_ids, row_seed, split_common_prefix, stop_on
from tokenizer import qa_prompt_ids

FORMATS = ("as-is", "fewshot")
LOOP_WORDS, LOOP_TIMES = 8, 3
FEWSHOT_K = {"gsm8k": 5, "mbpp": 3, "boolq": 3, "custom": 3}    # custom: a user's own file (pipeline --data)
FEWSHOT_STOPS = ["Question:"]
# One example in the target's own format: the few-shot answer prompt, and the whole examples that
# SS_MC learns to write with --target full (question and answer together).
EXAMPLE = "Question: {q}\nAnswer: {a}"
BOOLQ_WORDS = ("true", "false")      # data.py's labels; the chat format asks for True / False


def loops(text: str, n: int = LOOP_WORDS, times: int = LOOP_TIMES) -> bool:
    """True when some run of n words occurs `times` times or more: the signature of a decoder stuck
    in a repetition. A periodic run of p words repeated r times repeats each of its n-grams about
    r - n/p times, while a sound answer seldom says the same n words thrice."""
    words = text.split()
    counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return bool(counts) and max(counts.values()) >= times


def defines_function(code: str) -> bool:
    """MBPP gate: the code parses and defines at least one function."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) for node in ast.walk(tree))


def strip_fences(text: str) -> str:
    """The code inside a ``` fence when the answer has one (chat models often write one)."""
    m = re.search(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", text, re.S)
    return m.group(1).strip() if m else text.strip()


def gate(task: str, answer: str, finished: bool) -> str | None:
    """Why the answer is dropped, or None when it is kept (the gates of the module docstring)."""
    if not answer.strip():
        return "empty"
    if not finished:
        return "unfinished"
    if loops(answer):
        return "loop"
    if task == "gsm8k" and gsm8k_extract(answer) is None:
        return "no_final_answer"
    if task == "mbpp" and not defines_function(strip_fences(answer)):
        return "no_function"
    return None


def majority(finals: list[float | None]) -> tuple[float | None, float]:
    """GSM8K self-consistency: the final answer a strict majority of the k samples agree on (None
    when there is none), and the share of samples that agree with the most common answer."""
    votes = Counter(f for f in finals if f is not None)
    if not votes:
        return None, 0.0
    best, n = votes.most_common(1)[0]
    return (best if n > len(finals) / 2 else None), n / len(finals)


def reference(task: str, e: data.Example) -> str:
    """A train example's answer in the form students train on (GSM8K without calculator annotations,
    MBPP's code with Unix newlines, BoolQ's true/false)."""
    if task == "gsm8k":
        return gsm8k_clean(e.answer)
    return e.answer.replace("\r\n", "\n").strip()


def fewshot_prefix(task: str, shots: list[data.Example]) -> str:
    """k solved training examples, each in EXAMPLE's format, a blank line after each."""
    return "".join(EXAMPLE.format(q=e.text, a=reference(task, e)) + "\n\n" for e in shots)


def split_example(text: str) -> tuple[str, str] | None:
    """A whole generated example (EXAMPLE's format) -> (question, answer), or None when it has no
    "Answer:" part."""
    q, sep, a = text.partition("\nAnswer:")
    if not sep:
        return None
    q = q.strip()
    q = q[len("Question:"):].strip() if q.startswith("Question:") else q
    return (q, a.strip()) if q and a.strip() else None


@dataclass
class Answerer:
    """The answering LM of Step 3 with its prompt format; `answer(questions, seed)` -> records."""
    model: object
    tok: object
    task: str
    fmt: str                   # "as-is" | "fewshot"
    template: str              # as-is: "{q}" (SoftSRV) or Fig. 9's template (PT, PT_SR)
    shots: list                # fewshot: the training examples of the prefix
    max_tokens: int
    temperature: float = 0.0
    samples: int = 1           # GSM8K self-consistency: k sampled answers per question
    batch_size: int = 16
    min_tokens: int = 0        # EOS is not drawn before this many answer tokens (sampling.generate_from_ids)

    def prompt_ids(self, question: str) -> list[int]:
        if self.fmt == "fewshot":
            text = fewshot_prefix(self.task, self.shots) + f"Question: {question}\nAnswer:"
            return self.tok.with_bos(self.tok.encode(text))
        return qa_prompt_ids(self.tok, self.template.format(q=question))

    def answer(self, questions: list[str], seed: int, indices: list[int] | None = None) -> list[dict]:
        """One record per question: the answer to train on, whether it finished, and `drop`, the
        gate it failed (None: kept). Sample j of question `indices[i]` draws from its own generator
        (row_seed), so an answer does not depend on which questions share its batch or chunk."""
        if self.task == "boolq":
            return self._boolq(questions)
        k = self.samples
        indices = list(range(len(questions))) if indices is None else indices
        prompts = [self.prompt_ids(q) for q in questions for _ in range(k)]
        seeds = [row_seed(seed, i * k + j) for i in indices for j in range(k)]
        # the k-shot exemplars (the same tokens in every prompt) are prefilled once, shared by every row
        prefix, rest = split_common_prefix(prompts) if self.fmt == "fewshot" else ([], prompts)
        stop = stop_on(self.tok, FEWSHOT_STOPS) if self.fmt == "fewshot" else None
        outs, finished = generate_from_ids(self.model, rest, self.max_tokens, self.tok.eos_id,
                                           temperature=self.temperature, stop=stop, batch_size=self.batch_size,
                                           seeds=seeds, prefix=prefix, return_finished=True,
                                           min_new_tokens=self.min_tokens)
        recs = []
        for i in range(len(questions)):
            texts, fins = [], []
            for ids, fin in zip(outs[i * k:(i + 1) * k], finished[i * k:(i + 1) * k]):
                text = self.tok.decode(ids)
                fins.append(fin)       # ended its turn (EOS) or, few-shot, started the next "Question:"
                texts.append(cut_at(text, FEWSHOT_STOPS).strip() if self.fmt == "fewshot" else text.strip())
            if self.task == "mbpp":
                texts = [strip_fences(t) for t in texts]
            drops = [gate(self.task, t, f) for t, f in zip(texts, fins)]
            rec = {"answer": texts[0], "finished": fins[0], "drop": drops[0]}
            if k > 1:
                finals = [gsm8k_extract(t) if d is None else None for t, d in zip(texts, drops)]
                best, agree = majority(finals)
                chain = next((j for j, f in enumerate(finals) if best is not None and f == best), None)
                rec = {"answer": texts[chain] if chain is not None else texts[0],
                       "finished": fins[chain] if chain is not None else fins[0],
                       "drop": None if chain is not None else "no_majority",
                       "agreement": agree, "finals": finals}
            recs.append(rec)
        return recs

    @torch.no_grad()
    def _boolq(self, questions: list[str]) -> list[dict]:
        """The label of each passage/question: whichever of true / false the answerer finds more
        likely right after the prompt ("True"/"False" as its chat reply; " true"/" false" few-shot)."""
        if self.fmt == "fewshot":
            words = [" " + w for w in BOOLQ_WORDS]
        else:
            words = [w.capitalize() for w in BOOLQ_WORDS]
        ctxs = [self.prompt_ids(q) for q in questions]
        lp = choice_logprobs(self.model, ctxs, [self.tok.encode(w) for w in words], self.batch_size)
        return [{"answer": BOOLQ_WORDS[int(row.argmax())], "finished": True, "drop": None,
                 "logprobs": dict(zip(BOOLQ_WORDS, row.tolist()))} for row in lp]
