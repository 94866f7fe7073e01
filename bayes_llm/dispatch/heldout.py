"""The dispatcher on the routing benchmark (bayes_llm/data/routing.py): routing and `other` metrics,
and answers under soft blends, hard top-1 routing and oracle routing.

Rows carry `kind` (heldout | mixed | other), `target` (a domain or `other`) and `mix` (the experts the
prompt needs by construction: {domain: 1} for a held-out phrasing, two halves for a mixed prompt,
{} for off-domain). Routing accuracy and calibration use the rows with one right label (held-out
and off-domain); mixed rows are judged by where their posterior mass goes and by their answers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from bayes_llm.dispatch.calibration import nll, reliability
from bayes_llm.dispatch.controller import OTHER, Controller
from bayes_llm.stats import paired_bootstrap

SINGLE = ("heldout", OTHER)  # kinds with one right label


def single(rows: Sequence[dict]) -> list[int]:
    """Indices of the rows with one right label."""
    return [i for i, row in enumerate(rows) if row["kind"] in SINGLE]


def targets(controller: Controller, rows: Sequence[dict]) -> list[int]:
    return [controller.labels.index(row["target"]) for row in rows]


def other_scores(controller: Controller, posterior: torch.Tensor, is_other: Sequence[bool]) -> dict:
    """Precision and recall of `other` (the route to the base) against the rows that should go there."""
    routed = np.array([controller.route(row) == OTHER for row in posterior])
    truth = np.asarray(is_other, dtype=bool)
    hits = int((routed & truth).sum())
    return {
        "precision": round(hits / routed.sum(), 4) if routed.any() else None,
        "recall": round(hits / truth.sum(), 4) if truth.any() else None,
        "routed": int(routed.sum()),
        "should": int(truth.sum()),
    }


def fit_other_threshold(
    controller: Controller, logliks: torch.Tensor, is_other: Sequence[bool], min_precision: float
) -> Controller | None:
    """The threshold with the best `other` recall whose precision is ≥ `min_precision` on these rows
    (ties: the lowest threshold, which sends the fewest in-domain prompts to the base). None when no
    threshold reaches that precision or there are no off-domain rows."""
    truth = np.asarray(is_other, dtype=bool)
    if not truth.any():
        return None
    posterior = controller.posterior(logliks)
    confidence = posterior.max(dim=-1).values.numpy()
    argmax_other = (posterior.argmax(dim=-1) == len(controller.labels) - 1).numpy()
    best = None
    # Routed to `other` iff argmax is `other` or confidence < threshold: candidates are just above
    # each confidence (and 0: only the argmax).
    for threshold in [0.0, *sorted({math.nextafter(float(c), 2.0) for c in confidence})]:
        routed = argmax_other | (confidence < threshold)
        if not routed.any():
            continue
        precision = (routed & truth).sum() / routed.sum()
        recall = (routed & truth).sum() / truth.sum()
        if precision >= min_precision and (best is None or recall > best[0]):
            best = (recall, threshold)
    return None if best is None else replace(controller, threshold=float(best[1]))


def _shares(controller: Controller, posterior: torch.Tensor, mix: dict[str, float]) -> list[float]:
    return [float(posterior[controller.labels.index(d)]) for d in mix]


def routing_report(before: Controller, after: Controller, logliks: torch.Tensor, rows: Sequence[dict]) -> dict:
    """The `heldout` block: routing on held-out phrasings, calibration on the single-label rows,
    `other` precision/recall on every row, and where mixed prompts' posterior mass goes."""
    index = single(rows)
    picked = [rows[i] for i in index]
    gold = targets(after, picked)
    post_before, post_after = before.posterior(logliks[index]), after.posterior(logliks[index])
    calibration = {"before": reliability(post_before, gold), "after": reliability(post_after, gold)}
    heldout = [i for i, row in enumerate(rows) if row["kind"] == "heldout"]
    posterior = after.posterior(logliks)
    routes = [after.route(row) for row in posterior]
    per_domain: dict[str, list[bool]] = {}
    for i in heldout:
        per_domain.setdefault(rows[i]["target"], []).append(routes[i] == rows[i]["target"])
    mixed = [i for i, row in enumerate(rows) if row["kind"] == "mixed"]
    mixed_posterior = posterior[mixed] if mixed else None
    other = other_scores(after, posterior, [row["kind"] == OTHER for row in rows])
    labels = list(after.labels)
    matrix = np.zeros((len(labels), len(labels)), dtype=int)
    for i in index:
        matrix[labels.index(rows[i]["target"]), labels.index(routes[i])] += 1
    return {
        "routing_accuracy": round(float(np.mean([routes[i] == rows[i]["target"] for i in heldout])), 4),
        "routing_accuracy_per_domain": {d: round(float(np.mean(v)), 4) for d, v in sorted(per_domain.items())},
        "ece_before": calibration["before"]["ece"],
        "ece_after": calibration["after"]["ece"],
        "nll_before": round(nll(before, logliks[index], gold), 5),
        "nll_after": round(nll(after, logliks[index], gold), 5),
        "other_precision": other["precision"],
        "other_recall": other["recall"],
        # Mixed rows: the posterior mass on the two experts they need, and the smaller one's share of
        # it (0.5: the constructed half-and-half; 0: all on one, as hard routing would do).
        "mixed_mass_on_mix": None if not mixed else round(float(np.mean([
            sum(_shares(after, p, rows[i]["mix"])) for i, p in zip(mixed, mixed_posterior, strict=True)])), 4),
        "mixed_minor_share": None if not mixed else round(float(np.mean([
            min(_shares(after, p, rows[i]["mix"])) / max(sum(_shares(after, p, rows[i]["mix"])), 1e-12)
            for i, p in zip(mixed, mixed_posterior, strict=True)])), 4),
        "items": {kind: sum(row["kind"] == kind for row in rows) for kind in ("heldout", "mixed", OTHER)},
        "confusion": {"labels": labels, "matrix": matrix.tolist()},  # rows: right label; columns: routed
        "reliability": calibration,
    }  # fmt: skip


def systems(controller: Controller, posterior: torch.Tensor, rows: Sequence[dict], top_k: int) -> dict:
    """The blend each system answers every row with: `soft` (the controller's weighted average),
    `hard` (top-1), `oracle` (the mix the row needs by construction) and `base`."""
    return {
        "base": [{} for _ in rows],
        "hard": [controller.blend(p, "max") for p in posterior],
        "soft": [controller.blend(p, "weighted_average", top_k) for p in posterior],
        "oracle": [dict(row["mix"]) for row in rows],
    }


def compare(scores: dict[str, list[float]], rows: Sequence[dict], resamples: int, seed: int) -> dict:
    """Accuracy per system on held-out and mixed rows, and paired CIs of soft against the others.
    `adaptive_over_oracle`: the held-out mean over domains, soft / oracle."""
    out = {}
    for kind in ("heldout", "mixed"):
        index = [i for i, row in enumerate(rows) if row["kind"] == kind]
        if not index:
            continue
        picked = {name: [values[i] for i in index] for name, values in scores.items()}
        block = {"items": len(index), "accuracy": {n: round(100 * float(np.mean(v)), 2) for n, v in picked.items()}}
        for other in ("hard", "oracle", "base"):
            block[f"soft_minus_{other}"] = paired_bootstrap(picked[other], picked["soft"], resamples, seed)
        out[kind] = block
    domains = sorted({row["target"] for row in rows if row["kind"] == "heldout"})
    if domains:
        mean = {name: float(np.mean([np.mean([values[i] for i, row in enumerate(rows)
                                              if row["kind"] == "heldout" and row["target"] == d]) for d in domains]))
                for name, values in scores.items()}  # fmt: skip
        out["heldout_mean"] = {name: round(100 * v, 2) for name, v in mean.items()}
        out["adaptive_over_oracle"] = round(mean["soft"] / mean["oracle"], 4) if mean["oracle"] else None
    return out
