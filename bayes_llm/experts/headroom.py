"""RL's headroom on a split: pass@1 (greedy) beside pass@k (k completions sampled at a temperature).

RL on a correctness reward turns what a model sometimes gets right into what it gets right first:
its gain is bounded by pass@k − pass@1. Measured for the base and for the SFT z RL starts from.
pass@k overstates what RL can reach where a guess can be right: of 4 choices, 8 guesses name the
right one 90 % of the time. `Samples` keeps each completion's verdict and answer, so the majority
vote of the k (what sharpening the sampled distribution toward its mode would answer) and the
chance level can be set beside it (`python -m benchmarks.headroom`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bayes_llm.experts.objectives import rollouts
from bayes_llm.rewards.answers import extract_choice, extract_number
from bayes_llm.rewards.correctness import correctness


def read_answer(kind: str, completion: str, row: dict) -> str | None:
    """The answer a completion gives, in a form that compares equal for the same answer (None: none
    read; code: programs are not grouped, two right programs rarely match)."""
    if kind == "number":
        number = extract_number(completion)
        return None if number is None else repr(float(number) + 0.0)  # + 0.0: -0 and 0 are one answer
    if kind == "letter":
        return extract_choice(completion, row.get("choices"))
    return None


@dataclass(frozen=True)
class Samples:
    """k sampled completions per row: whether each is right and the answer it gives; `grouped`: whether
    equal answers are the same answer (not for code)."""

    k: int
    hits: list[list[float]]
    answers: list[list[str | None]]
    grouped: bool

    def any_right(self) -> list[float]:
        """Per row: 1.0 where one of the k is right (pass@k's numerator)."""
        return [max(row) for row in self.hits]

    def majority_right(self) -> list[float] | None:
        """Per row: 1.0 where the answer most of the k give is right (ties: the one given first;
        no answer read: wrong). None for code, whose answers are not grouped."""
        if not self.grouped:
            return None
        voted = []
        for hits, answers in zip(self.hits, self.answers, strict=True):
            counts = Counter(a for a in answers if a is not None)
            top = counts.most_common(1)[0][0] if counts else None
            voted.append(hits[answers.index(top)] if top is not None else 0.0)
        return voted


def sample(model, tokenizer, kind: str, rows: Sequence[dict], k: int, temperature: float, max_new_tokens: int,
           batch_size: int, seed: int) -> Samples:  # fmt: skip
    """k completions per row sampled at `temperature` (seeded), each scored by the correctness reward."""
    model.eval()
    torch.manual_seed(seed)
    hits, answers = [], []
    per_batch = max(1, batch_size // k)  # rows per generate call: k completions each
    for start in range(0, len(rows), per_batch):
        chunk = list(rows[start : start + per_batch])
        texts = rollouts(model, tokenizer, chunk, k, temperature, max_new_tokens).texts
        repeated = [row for row in chunk for _ in range(k)]
        verdicts = correctness(kind, texts, repeated)
        read = [read_answer(kind, text, row) for text, row in zip(texts, repeated, strict=True)]
        hits += [verdicts[i * k : (i + 1) * k] for i in range(len(chunk))]
        answers += [read[i * k : (i + 1) * k] for i in range(len(chunk))]
    return Samples(k, hits, answers, grouped=kind != "code")


def pass_at_k(model, tokenizer, kind: str, rows: Sequence[dict], k: int, temperature: float, max_new_tokens: int,
              batch_size: int, seed: int) -> float:  # fmt: skip
    """The share of rows with a right answer among k completions sampled at `temperature` (pass@1, the
    greedy accuracy on the same rows, is what the trainer's validation measures)."""
    solved = sample(model, tokenizer, kind, rows, k, temperature, max_new_tokens, batch_size, seed).any_right()
    return sum(solved) / max(len(rows), 1)
