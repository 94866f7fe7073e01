"""Paired bootstrap confidence intervals for accuracy differences on the same items."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def paired_bootstrap(
    before: Sequence[float], after: Sequence[float], resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> dict:
    """Mean of (after − before) per item, in points, with a percentile bootstrap CI over items."""
    a, b = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired samples must be non-empty and equal in length ({a.size} vs {b.size})")
    diff = b - a
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(resamples, diff.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {
        "gain_points": round(100 * float(diff.mean()), 2),
        "ci_low": round(100 * float(low), 2),
        "ci_high": round(100 * float(high), 2),
        "level": level,
        "items": int(diff.size),
    }
