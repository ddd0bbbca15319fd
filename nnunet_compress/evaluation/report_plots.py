"""PNG plots of a comparison: per-class Dice of base vs compressed, and cost against mean Dice (Pareto).

matplotlib with the non-interactive Agg backend, so plots are written on headless machines and in tests. Both
plots are drawn from the summary dict alone (the numbers in ``summary.json``).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MAX_BAR_CLASSES = 40  # above this, bars get unreadable: draw base-vs-compressed scatter per class instead


def plot_dice_per_class(summary: dict, path: Path) -> Path:
    """Mean Dice per class: grouped bars (few classes) or compressed-vs-base scatter (many classes)."""
    models = summary["models"]
    classes = summary["classes"]
    table = {(r["model"], r["label"]): r["dice"] for r in summary["per_class"]}
    if len(classes) <= MAX_BAR_CLASSES:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(classes) * len(models) + 2), 4.5))
        width = 0.8 / len(models)
        for i, m in enumerate(models):
            xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(classes))]
            ys = [_nan_to_zero(table[(m["name"], c["label"])]) for c in classes]
            ax.bar(xs, ys, width, label=f"{m['name']} (mean {m['mean_dice']:.3f})")
        ax.set_xticks(range(len(classes)))
        ax.set_xticklabels([c["name"] for c in classes], rotation=45 if len(classes) > 6 else 0, ha="right"
                           if len(classes) > 6 else "center")
        ax.set_ylabel("mean Dice over test cases")
        ax.set_ylim(0, 1.05)
    else:
        fig, ax = plt.subplots(figsize=(6.5, 6.5))
        base = models[0]["name"]
        for m in models[1:]:
            xs = [table[(base, c["label"])] for c in classes]
            ys = [table[(m["name"], c["label"])] for c in classes]
            ax.scatter(xs, ys, s=12, label=f"{m['name']} (mean {m['mean_dice']:.3f})")
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
        ax.set_xlabel(f"{base}: mean Dice per class")
        ax.set_ylabel("compressed: mean Dice per class")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
    ax.set_title(f"Dice per class ({len(summary['cases'])} test cases)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated by another (lower or equal cost AND higher or equal Dice, one strictly)."""
    front = []
    for i, (c, d) in enumerate(points):
        dominated = any((c2 <= c and d2 >= d) and (c2 < c or d2 > d) for j, (c2, d2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_pareto(summary: dict, cost: str, path: Path) -> Path:
    """Mean Dice against cost (``flops`` in GFLOPs or ``latency_s`` in ms) per model, Pareto front joined."""
    scale, label = (1e-9, "GFLOPs per patch (torch count)") if cost == "flops" else (1e3, "latency per patch (ms)")
    models = [m for m in summary["models"] if m.get(cost) is not None and not math.isnan(m["mean_dice"])]
    points = [(m[cost] * scale, m["mean_dice"]) for m in models]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for m, (x, y) in zip(models, points):
        ax.scatter([x], [y], s=50, marker="s" if m["role"] == "base" else "o",
                   color="black" if m["role"] == "base" else None, zorder=3)
        ax.annotate(m["name"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    front = pareto_front(points)
    if len(front) > 1:
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], color="tab:red", linewidth=1,
                label="Pareto front", zorder=2)
        ax.legend(fontsize=8)
    ax.margins(x=0.35, y=0.2)  # room for the model names beside the points
    ax.set_xlabel(label)
    ax.set_ylabel("mean Dice (over classes)")
    ax.set_title("cost vs segmentation quality")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _nan_to_zero(v: float) -> float:
    return 0.0 if v is None or math.isnan(v) else v
