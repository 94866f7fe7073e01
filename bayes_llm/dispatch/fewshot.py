"""Few-shot adaptation: a cross-entropy-method search over expert mixing weights α.

A candidate α mixes the experts' deviations from the base, s = 1 + Σ_e α_e (s_e − 1), per matrix
(one α per expert, or per expert and layer), so α = 0 is the base and a one-hot α is one expert;
weights outside [0, 1] interpolate past an expert. Each candidate is scored on the k examples of
the new task by greedy correctness, ties broken by the log-likelihood of the reference answers.
The first population holds the base and every single expert, so the search starts from the best of
them and can only improve on it (on the k examples).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bayes_llm.errors import UserError

_LAYER = re.compile(r"\.(\d+)\.")


def layer_of(name: str) -> int:
    """The block index in a target's module name (model.layers.3.feed_forward.up_proj → 3); 0 if none."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else 0


def mixed_scales(
    alpha: np.ndarray, expert_scales: Mapping[str, Mapping[str, torch.Tensor]], per_layer: bool
) -> dict[str, torch.Tensor]:
    """alpha: [experts] or [experts, layers] → effective scales per target matrix."""
    experts = list(expert_scales)
    names = list(next(iter(expert_scales.values())))
    out = {}
    for name in names:
        total = torch.ones_like(expert_scales[experts[0]][name])
        for e, expert in enumerate(experts):
            weight = float(alpha[e, layer_of(name)] if per_layer else alpha[e])
            total = total + weight * (expert_scales[expert][name] - 1)
        out[name] = total
    return out


@dataclass
class SearchResult:
    alpha: np.ndarray
    reward: float
    loglik: float
    history: list[dict]  # per iteration: best and elite-mean reward, the mean α


def cem_search(
    score: Callable[[np.ndarray], tuple[float, float]],
    shape: tuple[int, ...],
    population: int,
    elites: int,
    iterations: int,
    seed: int,
    init_std: float = 0.5,
    min_std: float = 0.02,
) -> SearchResult:
    """Maximise score(α) = (reward, loglik) lexicographically. `shape`: (experts,) or (experts, layers)."""
    if not 0 < elites <= population:
        raise ValueError(f"elites must be in 1..population ({population}), got {elites}")
    rng = np.random.default_rng(seed)
    experts = shape[0]
    mean = np.full(shape, 1.0 / experts)
    std = np.full(shape, init_std)
    seeds = [np.zeros(shape)] + [np.eye(experts)[e].reshape((experts,) + (1,) * (len(shape) - 1)) * np.ones(shape)
                                 for e in range(experts)]  # fmt: skip
    best: tuple[tuple[float, float], np.ndarray] | None = None
    history = []
    for iteration in range(iterations):
        draws = [mean + std * rng.standard_normal(shape) for _ in range(population)]
        candidates = (seeds + draws) if iteration == 0 else draws
        scored = sorted(((score(a), i, a) for i, a in enumerate(candidates)), key=lambda x: (x[0], -x[1]), reverse=True)
        top = [a for _, _, a in scored[:elites]]
        if best is None or scored[0][0] > best[0]:
            best = (scored[0][0], scored[0][2])
        mean = np.mean(top, axis=0)
        std = np.maximum(np.std(top, axis=0), min_std)
        history.append({
            "iteration": iteration,
            "best_reward": scored[0][0][0],
            "elite_reward": float(np.mean([s[0][0] for s in scored[:elites]])),
            "mean_alpha": np.round(mean.reshape(experts, -1).mean(axis=1), 4).tolist(),
        })  # fmt: skip
    assert best is not None
    return SearchResult(alpha=best[1], reward=best[0][0], loglik=best[0][1], history=history)


def shots_of(rows: Sequence[dict], k: int, seed: int) -> list[dict]:
    """k examples of a task, drawn reproducibly."""
    if k > len(rows):
        raise ValueError(f"{k} shots asked, the task has {len(rows)} rows")
    order = np.random.default_rng(seed).permutation(len(rows))[:k]
    return [rows[int(i)] for i in order]


def read_examples(path: Path) -> list[dict]:
    """Few-shot rows from a JSONL file: `prompt` and `answer` (+ `tests` for code), one object per line."""
    if not Path(path).is_file():
        raise UserError(f"{path}: examples file not found")
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number}: not a JSON object ({error.msg})") from None
        if not isinstance(row, dict) or not {"prompt", "answer"} <= set(row):
            raise UserError(f"{path}:{number}: each example needs 'prompt' and 'answer'")
        rows.append({**row, "answer": str(row["answer"])})
    if not rows:
        raise UserError(f"{path}: no examples")
    return rows
