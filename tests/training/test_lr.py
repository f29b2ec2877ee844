"""The learning-rate schedule: 10% linear warm-up, then linear decay towards a tenth of the peak."""

from __future__ import annotations

import numpy as np
import pytest

from eetq_lora.training.lr import learning_rate, warmup_steps


@pytest.mark.parametrize("total, warmup", [(1, 1), (4, 1), (10, 1), (16, 2), (20, 2), (60, 6), (100, 10), (1000, 100)])
def test_warmup_is_a_tenth_of_the_steps_and_at_least_one(total, warmup):
    assert warmup_steps(total) == warmup


def test_hand_computed_rates():
    # 20 steps, peak 0.01: 2 warm-up steps (0.005, 0.01), then 18 steps from 0.01 towards 0.001.
    expected = {0: 0.005, 1: 0.01, 2: 0.01, 11: 0.01 * (1 - 0.9 * 9 / 18), 19: 0.01 * (1 - 0.9 * 17 / 18)}
    for step, rate in expected.items():
        assert learning_rate(step, 20, 0.01) == pytest.approx(rate, rel=1e-12), step
    # One warm-up step: the peak at once, and a tenth of it once the decay is over.
    assert learning_rate(0, 10, 1.0) == 1.0
    assert learning_rate(10, 10, 1.0) == pytest.approx(0.1, rel=1e-12)
    assert learning_rate(50, 10, 1.0) == pytest.approx(0.1, rel=1e-12)  # past the end it stays there
    assert learning_rate(0, 1, 3e-4) == 3e-4


@pytest.mark.parametrize("total", [1, 3, 7, 20, 61, 250])
def test_every_step_matches_the_schedule_drawn_as_two_line_segments(total):
    peak = 2e-4
    warmup = max(1, round(total / 10))
    steps = np.arange(total)
    # Warm-up: a line from peak/warmup at step 0 to the peak at step warmup-1; decay: a line from the
    # peak at step warmup to peak/10 at step total.
    rising = np.interp(steps, [0, max(warmup - 1, 1e-9)], [peak / warmup, peak])
    falling = np.interp(steps, [warmup, max(total, warmup + 1)], [peak, peak / 10])
    expected = np.where(steps < warmup, rising, falling)
    got = np.array([learning_rate(int(step), total, peak) for step in steps])
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert got.max() == pytest.approx(peak) and (got > 0).all()
    top = int(np.argmax(got))
    assert (np.diff(got[: top + 1]) >= 0).all() and (np.diff(got[top:]) <= 0).all()


def test_the_rate_depends_on_the_step_alone():
    # A resumed run needs no scheduler state: asking out of order gives the same rates.
    forward = [learning_rate(step, 30, 0.01) for step in range(30)]
    backward = [learning_rate(step, 30, 0.01) for step in reversed(range(30))]
    assert forward == backward[::-1]
