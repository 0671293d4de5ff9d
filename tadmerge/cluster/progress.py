"""Progress of a long merge: a bar on a terminal, log lines elsewhere.

Nightly jobs read logs (`ray job logs`), people watch terminals: both see units
done, bytes processed, throughput and an ETA.

What the lines say stays true after a `--resume` and through reruns: a unit is
counted once, however often it is reported done (a TIES block rerun with its
tensor's majority sign, a unit a replacement worker redid); the units a resumed
merge reused count as done from the start, but not as bytes processed by this
run, so the throughput and the ETA are this run's. The ETA is never negative,
and the units done never exceed the total.
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
    """`total_units` units in all, of which `reused` are done already; the others
    weigh `total_bytes` (the input bytes this run reads for them)."""

    def __init__(
        self,
        stage: str,
        total_units: int,
        total_bytes: int,
        mode: str = "auto",
        reused: int = 0,
        clock=time.monotonic,
    ):
        self.stage = stage
        self.total_units = total_units
        self.total_bytes = max(1, total_bytes)
        self.reused = min(max(0, reused), total_units)
        self._seen: set[int] = set()
        self.bytes = 0
        self._clock = clock
        self.start = clock()
        self._last_log = -1e18
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

    @property
    def units(self) -> int:
        return min(self.total_units, self.reused + len(self._seen))

    def update(self, unit: int, nbytes: int = 0) -> None:
        """Unit `unit` (an id) is done, having read `nbytes`: counted the first time only."""
        if unit in self._seen:
            return
        self._seen.add(unit)
        nbytes = max(0, min(nbytes, self.total_bytes - self.bytes))
        self.bytes += nbytes
        if self._bar is not None:
            self._bar.update(nbytes)
            self._bar.set_postfix_str(f"{self.units}/{self.total_units} units")
        elif self.mode == "log":
            now = self._clock()
            if now - self._last_log >= 5.0 or self.units == self.total_units:
                self._last_log = now
                log.info(self.line())

    def line(self) -> str:
        el = max(1e-9, self._clock() - self.start)
        rate = self.bytes / el
        left_bytes = max(0, self.total_bytes - self.bytes)
        if self.units >= self.total_units or left_bytes == 0:
            eta = "0s"
        elif rate > 0:
            eta = f"{left_bytes / rate:.0f}s"
        else:
            eta = "?"
        reused = f" ({self.reused} reused)" if self.reused else ""
        return (
            f"{self.stage}: {self.units}/{self.total_units} units{reused}, "
            f"{_human(self.bytes)}/{_human(self.total_bytes)}, {_human(rate)}/s, ETA {eta}"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
