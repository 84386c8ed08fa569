"""Pictures of results: test accuracy against achieved sparsity, one line per method, dense as a band."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def plot_accuracy_vs_sparsity(
    series: Mapping[str, Sequence[tuple[float, float]]],
    dense: Sequence[float],
    path: str | Path,
    title: str = "",
) -> Path:
    """Write a PNG: for each method, its runs grouped by target and drawn at their mean achieved sparsity and mean
    accuracy, with the seed spread as error bars (one standard deviation), joined by a line; the dense runs as a
    horizontal band (mean +- one standard deviation).

    Args:
        series: ``{method: [(target, achieved sparsity, accuracy), ...]}`` per run (accuracy in %).
        dense: the dense runs' accuracies.
        path: the PNG to write.
        title: the figure's title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    if dense:
        mean, std = _mean_std(dense)
        ax.axhspan(mean - std, mean + std, color="0.85", label=f"dense {mean:.1f}")
        ax.axhline(mean, color="0.5", lw=1)
    colors = plt.get_cmap("tab10").colors
    for i, (method, runs) in enumerate(series.items()):
        by_target: dict[float, list[tuple[float, float]]] = {}
        for target, achieved, accuracy in runs:
            by_target.setdefault(target, []).append((achieved, accuracy))
        xs, ys, errs = [], [], []
        for target in sorted(by_target):
            points = by_target[target]
            xs.append(statistics.mean(p[0] for p in points))
            mean, std = _mean_std([p[1] for p in points])
            ys.append(mean)
            errs.append(std)
        style = {"color": colors[i % 10], "ls": "-" if i < 10 else "--", "marker": "o" if i < 10 else "s"}
        ax.errorbar(xs, ys, yerr=errs, ms=4, capsize=3, lw=1.3, label=method, **style)
    ax.set_xlabel("achieved sparsity (fraction of exact zeros)")
    ax.set_ylabel("test accuracy (%)")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
