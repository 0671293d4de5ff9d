"""Progress of a long merge: a bar on a terminal, log lines elsewhere.

Nightly jobs read logs (`ray job logs`), people watch terminals: both see units
done, bytes processed, throughput and an ETA.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("tadmerge")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


class Progress:
    def __init__(self, stage: str, total_units: int, total_bytes: int, mode: str = "auto"):
        self.stage = stage
        self.total_units = total_units
        self.total_bytes = max(1, total_bytes)
        self.units = 0
        self.bytes = 0
        self.start = time.monotonic()
        self._last_log = 0.0
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = mode
        self._bar = None
        if mode == "bar":
            try:
                from tqdm import tqdm

                self._bar = tqdm(
                    total=total_bytes, unit="B", unit_scale=True, desc=stage, leave=False
                )
            except ImportError:
                self.mode = "log"

    def update(self, units: int = 1, nbytes: int = 0) -> None:
        self.units += units
        self.bytes += nbytes
        if self._bar is not None:
            self._bar.update(nbytes)
            self._bar.set_postfix_str(f"{self.units}/{self.total_units} units")
        elif self.mode == "log":
            now = time.monotonic()
            if now - self._last_log >= 5.0 or self.units == self.total_units:
                self._last_log = now
                log.info(self.line())

    def line(self) -> str:
        el = max(1e-9, time.monotonic() - self.start)
        rate = self.bytes / el
        left = (self.total_bytes - self.bytes) / rate if rate > 0 else float("inf")
        eta = f"{left:.0f}s" if left != float("inf") else "?"
        return (
            f"{self.stage}: {self.units}/{self.total_units} units, "
            f"{_human(self.bytes)}/{_human(self.total_bytes)}, {_human(rate)}/s, ETA {eta}"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
