"""Pin an EMR output's base: which bytes its task models are built on.

An EMR output stores only τ_uni, masks and rescalers: every task model is computed
from the base *at read time*. A base that changed since the merge (re-downloaded,
edited, a newer Hub revision) would silently give other task models, so `emr.json`
pins it: the Hub revision (commit sha) and, per base file, its size, the SHA-256 of
its header bytes (length prefix + JSON) and the SHA-256 of the whole file.

- At merge time the pins are computed in a background thread started with the
  merge (EMR merges only), so the whole-file digest (one sequential read of the
  base, mostly from the page cache the merge fills) overlaps the merge.
- At read time (`open_emr`) size and header are always checked (cheap: a stat
  and a header read per file); the whole-file digest only where asked for
  (`verify_base=True`: the default of `materialize` and of the eager
  `task_state_dict`, which read the whole base anyway).
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading

from ..errors import InputError, InputProblem
from ..io.checkpoint import Checkpoint
from ..io.identity import pread_exact

log = logging.getLogger("tadmerge")
_BLOCK = 8 * 2**20


class BaseChangedError(InputError):
    """The base of an EMR output is not the one it was merged from (exit 3)."""


def _rel(path: str, root: str) -> str:
    rel = os.path.relpath(path, root)
    return path if rel.startswith("..") else rel


def _header_digest(fd: int, size: int) -> str:
    """SHA-256 of the length prefix and the header (as io/identity.py hashes them)."""
    prefix = pread_exact(fd, 8, 0)
    n = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
    return hashlib.sha256(prefix + pread_exact(fd, min(n, max(0, size - 8)), 8)).hexdigest()


def _full_digest(fd: int, stop: threading.Event | None = None) -> str | None:
    digest = hashlib.sha256()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    offset = 0
    while True:
        if stop is not None and stop.is_set():
            return None
        n = os.preadv(fd, [buf], offset)
        if n <= 0:
            break
        digest.update(view[:n])  # hashlib releases the GIL on large buffers
        offset += n
    return digest.hexdigest()


def file_pin(path: str, *, full: bool, stop: threading.Event | None = None) -> dict:
    """{size, header_sha256[, sha256]} of one file (raises OSError)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        size = os.fstat(fd).st_size
        pin: dict = {"size": size, "header_sha256": _header_digest(fd, size)}
        if full:
            pin["sha256"] = _full_digest(fd, stop)
        return pin
    finally:
        os.close(fd)


class BasePinner:
    """The base's pins, computed in a daemon thread; `result()` waits for them."""

    def __init__(self, base: Checkpoint):
        self.base = base
        self._pins: list[dict] | None = None
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tadmerge-base-pin", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            pins = []
            for f in self.base.files:
                pin = file_pin(f, full=True, stop=self._stop)
                pins.append({"path": _rel(f, self.base.root), **pin})
            self._pins = pins
        except BaseException as e:  # reported by result()
            self._error = e

    def cancel(self) -> None:
        self._stop.set()

    def result(self) -> list[dict]:
        self._thread.join()
        if self._error is not None:
            e = self._error
            name = getattr(e, "filename", None) or self.base.root
            raise InputError(
                InputProblem(str(name), None, f"cannot read the base to pin it: {e}")
            ) from e
        assert self._pins is not None
        return self._pins


def base_pin_doc(base: Checkpoint, pins: list[dict]) -> dict:
    return {"revision": base.revision, "files": pins}


def check_base(emr_root: str, pinned: dict, base: Checkpoint, *, full: bool) -> None:
    """Refuse a base that differs from the pins of emr.json (BaseChangedError).

    `pinned` is emr.json's "base". Without "files" (an output of an older tadmerge)
    a warning is logged and nothing is checked.
    """
    files = pinned.get("files")
    if not isinstance(files, list):
        log.warning(
            "%s: emr.json does not pin its base (written by an older tadmerge); the base "
            "at %s is used as it is now, unchecked",
            emr_root,
            base.root,
        )
        return
    problems: list[InputProblem] = []
    rev = pinned.get("revision")
    if rev and base.revision and rev != base.revision:
        problems.append(
            InputProblem(base.root, None, f"base revision {base.revision} != pinned {rev}")
        )
    current = {_rel(f, base.root): f for f in base.files}
    for pin in files:
        rel = pin.get("path")
        path = current.pop(rel, None)
        if path is None:
            where = os.path.join(base.root, rel) if isinstance(rel, str) else base.root
            problems.append(InputProblem(where, None, "base file of the EMR merge is missing"))
            continue
        try:
            now = file_pin(path, full=full and "sha256" in pin)
        except OSError as e:
            problems.append(InputProblem(path, None, f"cannot read: {e.strerror or e}"))
            continue
        what = []
        if now["size"] != pin.get("size"):
            what.append(f"size {now['size']} != pinned {pin.get('size')}")
        if now["header_sha256"] != pin.get("header_sha256"):
            what.append("header differs (SHA-256)")
        if not what and "sha256" in now and now["sha256"] != pin.get("sha256"):
            what.append("content differs (SHA-256 of the whole file)")
        if what:
            problems.append(
                InputProblem(path, None, "base changed since the EMR merge: " + "; ".join(what))
            )
    for path in sorted(current.values()):
        problems.append(InputProblem(path, None, "base file not in the EMR merge's base"))
    if problems:
        raise BaseChangedError(problems)
