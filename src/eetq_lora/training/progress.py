"""A one-line live progress bar for training: step, loss, tokens/s and ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    """``75`` -> ``1:15``; ``3725`` -> ``1:02:05``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressBar:
    """Redraws one line on a terminal; elsewhere (logs, CI) prints a plain line every ~5% of the run."""

    def __init__(self, total: int, start: int = 0, stream: TextIO | None = None, width: int = 24) -> None:
        self.total = total
        self.start_step = start
        self.stream = stream or sys.stderr
        self.width = width
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = max(1, total // 20)
        self.started = time.perf_counter()
        self.tokens = 0

    def line(self, step: int, loss: float, elapsed: float) -> str:
        done = step - self.start_step
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) * elapsed / done if done > 0 else 0.0
        filled = int(self.width * step / self.total) if self.total else self.width
        bar = "#" * filled + "-" * (self.width - filled)
        return (
            f"step {step}/{self.total} [{bar}] loss {loss:.4f} | {rate:,.0f} tok/s | "
            f"elapsed {format_duration(elapsed)} | ETA {format_duration(eta)}"
        )

    def update(self, step: int, loss: float, tokens: int) -> None:
        """Record that optimizer step ``step`` (1-based count of finished steps) ended with ``loss``."""
        self.tokens += tokens
        text = self.line(step, loss, time.perf_counter() - self.started)
        if self.interactive:
            self.stream.write("\r\033[K" + text)
        elif step % self.every == 0 or step == self.total:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()
