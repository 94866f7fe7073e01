"""Calibrating the controller on val splits: temperature by likelihood, the `other` threshold by a
fallback budget, and the numbers that say how well it worked (ECE, reliability bins, confusion)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from bayes_llm.dispatch.controller import OTHER, Controller

# log10 T from 1e-2 to 1e2: a 1 % step is finer than the NLL can tell apart on a few hundred prompts.
_TEMPERATURES = np.logspace(-2, 2, 465)


def nll(controller: Controller, logliks: torch.Tensor, targets: Sequence[int]) -> float:
    posterior = controller.posterior(logliks)
    picked = posterior[torch.arange(len(targets)), torch.as_tensor(targets)]
    return float(-picked.clamp_min(1e-300).log().mean())


def fit_temperature(controller: Controller, logliks: torch.Tensor, targets: Sequence[int]) -> Controller:
    """The temperature with the lowest NLL of the true labels (grid search: deterministic, no local minima)."""
    losses = [nll(replace(controller, temperature=float(t)), logliks, targets) for t in _TEMPERATURES]
    return replace(controller, temperature=float(_TEMPERATURES[int(np.argmin(losses))]))


def fit_threshold(controller: Controller, logliks: torch.Tensor, max_fallback: float) -> Controller:
    """The highest threshold that sends at most `max_fallback` of the in-domain prompts to the base."""
    confidence = controller.posterior(logliks).max(dim=-1).values.numpy()
    if max_fallback <= 0 or confidence.size == 0:
        return replace(controller, threshold=0.0)
    threshold = float(np.quantile(confidence, max_fallback, method="lower"))
    if (confidence < threshold).mean() > max_fallback:  # ties at the quantile: step just below it
        threshold = math.nextafter(threshold, 0.0)
    return replace(controller, threshold=threshold)


def reliability(posterior: torch.Tensor, targets: Sequence[int], bins: int = 15) -> dict:
    """Expected calibration error of the top label, and the per-bin table behind it."""
    confidence, predicted = posterior.max(dim=-1)
    correct = (predicted == torch.as_tensor(targets)).double()
    edges = np.linspace(0.0, 1.0, bins + 1)
    table, ece = [], 0.0
    for i in range(bins):
        low, high = edges[i], edges[i + 1]
        inside = (confidence > low) & (confidence <= high) if i else (confidence >= low) & (confidence <= high)
        count = int(inside.sum())
        if count:
            mean_conf, accuracy = float(confidence[inside].mean()), float(correct[inside].mean())
            ece += count / len(targets) * abs(mean_conf - accuracy)
            table.append({"low": round(low, 4), "high": round(high, 4), "count": count,
                          "confidence": round(mean_conf, 4), "accuracy": round(accuracy, 4)})  # fmt: skip
    return {"ece": round(ece, 5), "bins": bins, "table": table}


def confusion(controller: Controller, posterior: torch.Tensor, targets: Sequence[int]) -> dict:
    """Rows: true domain; columns: routed label (a domain or `other`, i.e. the base)."""
    labels = list(controller.labels)
    matrix = np.zeros((len(labels) - 1, len(labels)), dtype=int)
    for row, target in zip(posterior, targets, strict=True):
        matrix[target, labels.index(controller.route(row))] += 1
    routed = int(np.trace(matrix[:, :-1]))
    return {
        "labels": labels,
        "matrix": matrix.tolist(),
        "routing_accuracy": round(routed / max(len(targets), 1), 4),
        "to_base": round(float(matrix[:, labels.index(OTHER)].sum()) / max(len(targets), 1), 4),
    }
