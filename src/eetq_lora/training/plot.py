"""The loss-curve PNG: training loss per step and the held-out loss where it was measured."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

from ..atomic import write_with_atomic


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
    held_out: Sequence[tuple[int, float]],
    title: str,
) -> None:
    """Write the plot to ``path`` atomically (matplotlib's Agg backend: no display needed).

    ``held_out`` holds the measured (step, held-out loss) points, step 0 being before training:
    each is a marker, and a line joins them only when there are measurements between the first
    and the last, so no trend is drawn that was never measured.
    """
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
    if held_out:
        xs, ys = [step for step, _ in held_out], [loss for _, loss in held_out]
        label = f"held-out loss: {ys[0]:.3f} before" + (f", {ys[-1]:.3f} after" if len(ys) > 1 else "")
        axes.plot(
            xs,
            ys,
            color="#de2d26",
            marker="o",
            linestyle="-" if len(xs) > 2 else "none",
            linewidth=1,
            zorder=3,
            label=label,
        )
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (nats per answer token)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    write_with_atomic(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)
