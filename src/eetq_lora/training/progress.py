"""Live progress bars (tqdm on stderr) for training, scoring and generation; hidden off a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


def format_duration(seconds: float) -> str:
    """``75`` -> ``1:15``; ``3725`` -> ``1:02:05``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def shows_progress(enabled: bool = True, stream: TextIO | None = None) -> bool:
    """Whether a bar is drawn: wanted (no --no-progress, the main process) and ``stream`` is a terminal."""
    stream = stream or sys.stderr
    return enabled and bool(getattr(stream, "isatty", lambda: False)())


def progress_bar(
    total: int | None,
    desc: str,
    unit: str,
    *,
    enabled: bool = True,
    initial: int = 0,
    stream: TextIO | None = None,
    bar_format: str | None = None,
    leave: bool = True,
) -> tqdm:
    """A tqdm bar on ``stream`` (stderr), disabled unless ``shows_progress(enabled, stream)``; ``leave``
    False erases it once closed."""
    stream = stream or sys.stderr
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        file=stream,
        dynamic_ncols=True,
        bar_format=bar_format,
        leave=leave,
        disable=not shows_progress(enabled, stream),
    )


class TrainingProgress:
    """One bar over optimizer steps with loss, tokens/s and ETA in its postfix (rates of this run only)."""

    FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"

    def __init__(self, total: int, start: int = 0, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total = total
        self.start_step = start
        self.stream = stream or sys.stderr
        self.tokens = 0
        self.started = time.perf_counter()
        self.bar = progress_bar(
            total, "training", "step", enabled=enabled, initial=start, stream=stream, bar_format=self.FORMAT
        )

    def postfix(self, step: int, loss: float, elapsed: float) -> str:
        done = step - self.start_step
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) * elapsed / done if done > 0 else 0.0
        return f"loss {loss:.4f}, {rate:,.0f} tok/s, ETA {format_duration(eta)}"

    def update(self, step: int, loss: float, tokens: int) -> None:
        """Record that optimizer step ``step`` (1-based count of finished steps) ended with ``loss``."""
        self.tokens += tokens
        self.bar.set_postfix_str(self.postfix(step, loss, time.perf_counter() - self.started), refresh=False)
        self.bar.update(step - self.bar.n)

    def note(self, message: str, log) -> None:
        """Print ``message`` above the bar if it is shown, else pass it to ``log``."""
        if self.bar.disable:
            log(message)
        else:
            self.bar.write(message, file=self.stream)

    def close(self) -> None:
        self.bar.close()
