"""The learning-rate schedule: linear warm-up, then linear decay toward a tenth of the peak.

The decay line reaches a tenth at step ``total_steps``, one past the last step, so the last step
runs slightly above it.
"""

from __future__ import annotations


def warmup_steps(total_steps: int) -> int:
    """Warm-up length: a tenth of the run, at least one step."""
    return max(1, round(0.1 * total_steps))


def learning_rate(step: int, total_steps: int, peak: float) -> float:
    """The rate for optimizer step ``step`` (0-based) of ``total_steps``.

    A pure function of the step, so a resumed run needs no scheduler state.
    """
    warmup = warmup_steps(total_steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return peak * (1.0 - 0.9 * progress)
