"""RL's headroom on a split: pass@1 (greedy) beside pass@k (k completions sampled at a temperature).

RL on a correctness reward turns what a model sometimes gets right into what it gets right first:
its gain is bounded by pass@k − pass@1. Measured for the base and for the SFT z RL starts from.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bayes_llm.experts.objectives import rollouts
from bayes_llm.rewards.correctness import correctness


def pass_at_k(model, tokenizer, kind: str, rows: Sequence[dict], k: int, temperature: float, max_new_tokens: int,
              batch_size: int, seed: int) -> float:  # fmt: skip
    """The share of rows with a right answer among k completions sampled at `temperature` (pass@1, the
    greedy accuracy on the same rows, is what the trainer's validation measures)."""
    model.eval()
    torch.manual_seed(seed)
    solved = []
    per_batch = max(1, batch_size // k)  # rows per generate call: k completions each
    for start in range(0, len(rows), per_batch):
        chunk = list(rows[start : start + per_batch])
        texts = rollouts(model, tokenizer, chunk, k, temperature, max_new_tokens).texts
        hits = correctness(kind, texts, [row for row in chunk for _ in range(k)])
        solved += [max(hits[i * k : (i + 1) * k]) for i in range(len(chunk))]
    return sum(solved) / max(len(rows), 1)
