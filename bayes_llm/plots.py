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
    if values:
        axis.legend()
    _save(figure, path)


def _save(figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp)
    plt.close(figure)


def reliability_plot(curves: dict[str, list[dict]], path: Path, title: str) -> None:
    """Reliability diagram: accuracy vs confidence per bin (bins from `calibration.reliability`)."""
    figure, axis = plt.subplots(figsize=(5.0, 5.0), dpi=120)
    axis.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfectly calibrated")
    for label, table in curves.items():
        axis.plot([b["confidence"] for b in table], [b["accuracy"] for b in table], marker="o", label=label)
    axis.set(
        title=title, xlabel="confidence (top posterior)", ylabel="routing accuracy", xlim=(0, 1.02), ylim=(0, 1.02)
    )
    axis.grid(alpha=0.3)
    axis.legend()
    _save(figure, path)


def confusion_plot(matrix: list[list[int]], rows: list[str], columns: list[str], path: Path, title: str) -> None:
    figure, axis = plt.subplots(figsize=(1.4 * len(columns) + 2, 1.2 * len(rows) + 1.5), dpi=120)
    axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(columns)), columns)
    axis.set_yticks(range(len(rows)), rows)
    top = max(max(r) for r in matrix) or 1
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            axis.text(j, i, str(value), ha="center", va="center", color="white" if value > top / 2 else "black")
    axis.set(title=title, xlabel="routed to", ylabel="true domain")
    _save(figure, path)


def grouped_bars(
    values: dict[str, dict[str, float]],
    path: Path,
    title: str,
    ylabel: str,
    errors: dict[str, dict[str, tuple[float, float]]] | None = None,
) -> None:
    """One group of bars per column (e.g. a domain), one bar per row (e.g. a system); optional
    (low, high) error bars per bar."""
    rows = list(values)
    columns = list(dict.fromkeys(c for row in values.values() for c in row))
    width = 0.8 / max(len(rows), 1)
    figure, axis = plt.subplots(figsize=(max(6.4, 1.1 * len(columns) * max(len(rows), 1) * 0.45 + 2), 4.2), dpi=120)
    for i, row in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j, c in enumerate(columns) if c in values[row]]
        ys = [values[row][c] for c in columns if c in values[row]]
        yerr = None
        if errors and row in errors:
            spans = [errors[row].get(c, (y, y)) for c, y in zip((c for c in columns if c in values[row]), ys,
                                                                 strict=True)]  # fmt: skip
            yerr = [[y - low for y, (low, _) in zip(ys, spans, strict=True)],
                    [high - y for y, (_, high) in zip(ys, spans, strict=True)]]  # fmt: skip
        axis.bar(xs, ys, width=width, label=row, yerr=yerr, capsize=2 if yerr else 0)
    axis.set_xticks(range(len(columns)), columns)
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set(title=title, ylabel=ylabel)
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize="small", ncol=2)
    _save(figure, path)


def expert_curves(curves: dict[str, list[tuple[int, float]]], kept_step: int, kept_val: float, path: Path,
                  title: str) -> None:  # fmt: skip
    """An expert's training on three panels: the SFT loss, the RL batch reward (raw and trailing mean)
    and greedy val accuracy with the kept z marked. `curves` is `train_expert.training_curves`."""
    columns = {name: list(zip(*points, strict=True)) for name, points in curves.items()}
    mean = next((name for name in columns if name.startswith("rl/reward_mean")), None)
    sft, val = columns.get("sft/loss"), columns.get("val_accuracy")
    rl = [*columns["rl/reward"], columns[mean][1]] if mean else None
    figure, (loss_axis, reward_axis, val_axis) = plt.subplots(1, 3, figsize=(13.0, 3.8), dpi=110)
    for axis, points, label in ((loss_axis, sft, "SFT (no SFT phase)"), (reward_axis, rl, "RL (no RL phase)")):
        if not points:
            axis.text(0.5, 0.5, label.split(" ", 1)[1], ha="center", va="center", transform=axis.transAxes)
    if sft:
        loss_axis.plot(sft[0], sft[1], color="tab:blue")
    loss_axis.set(title="SFT: train loss of z", xlabel="step", ylabel="cross-entropy")
    if rl:
        reward_axis.plot(rl[0], rl[1], color="tab:orange", alpha=0.3, label="batch reward")
        reward_axis.plot(rl[0], rl[2], color="tab:orange", label=mean.split("/")[1].replace("_", " "))
        reward_axis.legend(fontsize="small")
    reward_axis.set(title="RL: reward (share correct)", xlabel="step", ylabel="reward", ylim=(-0.02, 1.02))
    if val:
        val_axis.plot(val[0], val[1], marker="o", markersize=3, color="tab:green", label="greedy val accuracy")
    val_axis.axhline(val[1][0] if val else 0, color="grey", linestyle="--", linewidth=0.8, label="base (step 0)")
    val_axis.plot([kept_step], [kept_val], marker="*", markersize=14, color="tab:red", linestyle="none",
                  label=f"kept z: step {kept_step}, {100 * kept_val:.1f} %")  # fmt: skip
    val_axis.set(title="validation", xlabel="step", ylabel="accuracy", ylim=(-0.02, 1.02))
    val_axis.legend(fontsize="small")
    for axis in (loss_axis, reward_axis, val_axis):
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    _save(figure, path)
