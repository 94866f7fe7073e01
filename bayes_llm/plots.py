"""PNG pictures for the reports (DVC's HTML plots need a CDN; a PNG opens anywhere)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bayes_llm.io import atomic_path


def line_plot(series: dict[str, list[tuple[float, float]]], path: Path, title: str, xlabel: str, ylabel: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for label, points in series.items():
        if points:
            xs, ys = zip(*points, strict=True)
            axis.plot(xs, ys, label=label, marker="o" if len(points) < 30 else None, markersize=3)
    values = [y for points in series.values() for _, y in points]
    if values and min(values) > 0 and max(values) / min(values) > 5:
        axis.set_yscale("log")  # the first steps would otherwise flatten the rest
    axis.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp)
    plt.close(figure)
