"""Helpers for the CLI tests that the child processes they start import too."""

from __future__ import annotations


class CtrlCBeforeStep:
    """Stands in for StopRequest: Ctrl-C arrives during step ``step`` (the flag is read once per step)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.reads = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    @property
    def requested(self) -> bool:
        self.reads += 1
        return self.reads >= self.step
