"""A progress bar for long writes: on a terminal only, silent in logs and with -q."""

from __future__ import annotations

import time
from typing import TextIO


class Progress:
    """Bytes and items written, with an ETA, redrawn at most ten times a second."""

    def __init__(self, total_bytes: int, total_items: int, stream: TextIO, label: str) -> None:
        self.total_bytes = max(total_bytes, 1)
        self.total_items = total_items
        self.stream = stream
        self.label = label
        self.done_bytes = 0
        self.done_items = 0
        self.start = time.monotonic()
        self._last = 0.0

    @classmethod
    def maybe(
        cls, stream: TextIO, quiet: bool, total_bytes: int, total_items: int, label: str
    ) -> Progress | None:
        isatty = getattr(stream, "isatty", lambda: False)
        if quiet or not isatty():
            return None
        return cls(total_bytes, total_items, stream, label)

    def __call__(self, nbytes: int) -> None:
        self.done_bytes += nbytes
        self.done_items += 1
        now = time.monotonic()
        if now - self._last >= 0.1 or self.done_bytes >= self.total_bytes:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = min(self.done_bytes / self.total_bytes, 1.0)
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        elapsed = now - self.start
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        self.stream.write(
            f"\r{self.label} [{bar}] {frac:4.0%} {self.done_bytes / 2**20:,.0f}/"
            f"{self.total_bytes / 2**20:,.0f} MB {self.done_items}/{self.total_items} tensors "
            f"ETA {eta:4.0f}s"
        )
        self.stream.flush()

    def finish(self) -> None:
        self._draw(time.monotonic())
        self.stream.write("\n")
        self.stream.flush()
