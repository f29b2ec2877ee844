"""Ctrl-C during training: finish the current step, save a checkpoint, then stop."""

from __future__ import annotations

import signal
import sys
import threading


class StopRequest:
    """A context manager that turns the first SIGINT or SIGTERM into ``requested = True``.

    The training loop checks the flag between optimizer steps, so a stop never leaves a half-done
    update behind. A second Ctrl-C raises KeyboardInterrupt at once.
    """

    def __init__(
        self, notice: str = "Stopping after this step and saving a checkpoint (Ctrl-C again to abort now)..."
    ) -> None:
        self.requested = False
        self.notice = notice
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print("\n" + self.notice, file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
