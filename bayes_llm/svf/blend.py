"""Blending experts: posterior weights over experts → one vector of effective scales per matrix.

Experts are mixed in effective-scale space (`Expert.scales`), never in their raw parameters: for
`official` experts, averaging pre-sigmoid values (what the official CEM code does) gives a scale
that is not the average of the experts' scales.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch

BlendMode = Literal["weighted_average", "top_k", "max"]
BLEND_MODES: tuple[BlendMode, ...] = ("weighted_average", "top_k", "max")


def blend_weights(
    weights: Mapping[str, float], mode: BlendMode = "weighted_average", top_k: int = 2
) -> dict[str, float]:
    """Weights over experts that are ≥ 0 and sum to one (zeros dropped); ties go to the first name."""
    if mode not in BLEND_MODES:
        raise ValueError(f"unknown blending mode {mode!r}; modes: {', '.join(BLEND_MODES)}")
    bad = {name: w for name, w in weights.items() if not math.isfinite(w) or w < 0}
    if bad:
        raise ValueError(f"expert weights must be finite and >= 0, got {bad}")
    if not weights or sum(weights.values()) <= 0:
        raise ValueError("expert weights are all zero: nothing to blend (use the base weights instead)")
    ranked = sorted(weights.items(), key=lambda item: -item[1])  # stable: ties keep the given order
    if mode == "max":
        ranked = ranked[:1]
    elif mode == "top_k":
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        ranked = ranked[:top_k]
    total = sum(w for _, w in ranked)
    return {name: w / total for name, w in ranked if w > 0}


def blend_scales(
    scales: Mapping[str, Mapping[str, torch.Tensor]],
    weights: Mapping[str, float],
    mode: BlendMode = "weighted_average",
    top_k: int = 2,
) -> dict[str, torch.Tensor]:
    """Σ_e w_e · scales[e] per matrix, with the weights of `blend_weights`."""
    unknown = set(weights) - set(scales)
    if unknown:
        raise ValueError(f"weights for unknown experts: {', '.join(sorted(unknown))}")
    mixed = blend_weights(weights, mode, top_k)
    names = list(next(iter(scales.values())))
    with torch.no_grad():
        return {name: sum(w * scales[expert][name] for expert, w in mixed.items()) for name in names}
