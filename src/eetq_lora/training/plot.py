"""The loss-curve PNG: training loss per step and the held-out loss before and after."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

from ..files import write_with_atomic


def plotting_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (shorter at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def save_loss_plot(
    path: str | os.PathLike,
    train_losses: Sequence[float],
    held_out_before: float,
    held_out_after: float | None,
    title: str,
) -> None:
    """Write the plot to ``path`` atomically (matplotlib's Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    steps = list(range(1, len(train_losses) + 1))
    figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
    axes.plot(steps, train_losses, color="#9ecae1", linewidth=1, label="training loss (per step)")
    window = max(1, len(train_losses) // 10)
    if window > 1:
        axes.plot(
            steps,
            moving_average(train_losses, window),
            color="#3182bd",
            linewidth=2,
            label=f"training loss ({window}-step mean)",
        )
    axes.scatter(
        [0], [held_out_before], color="#de2d26", zorder=3, label=f"held-out loss before: {held_out_before:.3f}"
    )
    if held_out_after is not None:
        axes.scatter(
            [len(train_losses)],
            [held_out_after],
            color="#31a354",
            zorder=3,
            label=f"held-out loss after: {held_out_after:.3f}",
        )
        axes.plot(
            [0, len(train_losses)], [held_out_before, held_out_after], color="#636363", linestyle=":", linewidth=1
        )
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (nats per answer token)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    write_with_atomic(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)
