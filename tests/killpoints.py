"""Test-only kill points: end a merge at a named step, without any hook in tadmerge.

The production modules carry no fault injection. A test that needs a driver to
die at a precise step wraps one of the driver's own functions (by monkeypatching
in this process, or in a subprocess through this file run as a script) so that
the N-th time the step is reached an action runs: SIGKILL of the whole process
(kill -9: no cleanup, no flush, no atexit) or, in-process, an exception.

    python tests/killpoints.py --at units:3 -- merge CONFIG [--resume ...]
    python tests/killpoints.py --at before-rename -- merge.py CONFIG --overwrite

The words after `--` are tadmerge's command line, or a script (merge.py) and its
arguments, run as `__main__`. The process dies by SIGKILL at the point (exit
status -9 to subprocess), finishes normally if the point is never reached, and
exits UNREACHABLE if the point cannot be installed because the function it
wraps is gone (the code moved on: update POINTS).

Points (`NAME` or `NAME:N` for the N-th time, default the first):
  plan            the plan is made; nothing written yet
  staging         the staging directory and its plan fingerprint exist
  stats:N         the N-th statistics result reached the driver (not yet saved)
  stats-saved     the resolved statistics are saved in the resume log
  unit-written:N  the N-th finished unit reached the driver, not yet logged
  progress:N      the N-th finished unit counted by the progress (logged: in-process
                  the driver logs it as it stops)
  units:N         N unit records are in the resume log (the log's writer thread:
                  use it with sigkill; in-process, unit-written:N)
  finalize        index, config and report data written; report file not yet
  publish         the report is written; publishing starts
  before-manifest staging fsynced; manifest.json not yet written
  after-manifest  manifest.json written; the resume log is still there
  before-rename   manifest written; staging not yet renamed (or, --overwrite,
                  exchanged) with the output
  after-rename    in place; the resume log and (--overwrite) the old output
                  not yet removed
  before-state-removal  in place; removing the resume log (.tadmerge/) from it
  dance-between   --overwrite without RENAME_EXCHANGE: the old output moved aside,
                  the staging not yet renamed in (not in POINTS: forced)
"""

from __future__ import annotations

import argparse
import os
import runpy
import signal
import sys
from collections.abc import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNREACHABLE = 98  # the exit status when a kill point cannot be installed


class KillPointMissing(RuntimeError):
    """The function a kill point wraps does not exist (any more)."""


def sigkill() -> None:
    """Die as `kill -9` would: nothing flushed, no handler, no atexit."""
    os.kill(os.getpid(), signal.SIGKILL)


def interrupt() -> None:
    """In-process: what a Ctrl-C at that instant raises."""
    raise KeyboardInterrupt


def _nth(n: int, action: Callable[[], None]) -> Callable[[], None]:
    seen = {"n": 0}

    def fire() -> None:
        seen["n"] += 1
        if seen["n"] == n:
            action()

    return fire


def _get(obj, attr: str):
    real = getattr(obj, attr, None)
    if real is None:
        name = getattr(obj, "__name__", type(obj).__name__)
        raise KillPointMissing(f"{name}.{attr} is gone: update tests/killpoints.py")
    return real


def _before(setattr_, obj, attr: str, fire: Callable[[], None]) -> None:
    real = _get(obj, attr)

    def wrapped(*a, **kw):
        fire()
        return real(*a, **kw)

    setattr_(obj, attr, wrapped)


def _after(setattr_, obj, attr: str, fire: Callable[[], None]) -> None:
    real = _get(obj, attr)

    def wrapped(*a, **kw):
        out = real(*a, **kw)
        fire()
        return out

    setattr_(obj, attr, wrapped)


def _around_executor(setattr_, method: str, fire: Callable[[], None], after: bool) -> None:
    """Wrap the callback the driver hands to every executor's `method`
    (map_stats: on_result(key, result); run_units: on_done(record))."""
    from tadmerge.run import driver

    real_make = _get(driver, "make_executor")

    def make_executor(*a, **kw):
        ex = real_make(*a, **kw)
        real = _get(ex, method)

        def wrapped(*args):
            *head, callback = args

            def cb(*r):
                if not after:
                    fire()
                callback(*r)
                if after:
                    fire()

            return real(*head, cb)

        ex.__dict__[method] = wrapped  # the instance only
        return ex

    setattr_(driver, "make_executor", make_executor)


def _units_logged(setattr_, n: int, action: Callable[[], None]) -> None:
    """Fire once the resume log holds n unit records (run/unit_log.py writes
    them in batches, after their data is durable: one batch per unit here)."""
    from tadmerge.run import unit_log

    real = _get(unit_log.UnitLog, "_write_batch")
    setattr_(unit_log, "FLUSH_INTERVAL_S", 0.0)
    fired = {"done": False}

    def write_batch(self):
        real(self)
        if not fired["done"]:
            with open(self.path, "rb") as f:
                if f.read().count(b"\n") >= n:
                    fired["done"] = True
                    action()

    setattr_(unit_log.UnitLog, "_write_batch", write_batch)


def _state_removal(setattr_, publish, fire: Callable[[], None]) -> None:
    """Fire as publish removes the resume log (.tadmerge/) from the output, once
    the output is in place (with --overwrite: the old output renamed aside)."""
    real = _get(publish.shutil, "rmtree")

    def rmtree(path, *a, **kw):
        if os.path.basename(os.fsdecode(path)) == publish.STATE_DIR:
            fire()
        return real(path, *a, **kw)

    setattr_(publish.shutil, "rmtree", rmtree)


def install(point: str, action: Callable[[], None], setattr_=setattr) -> None:
    """Make `action` run when the merge reaches `point` (see the module doc).

    `setattr_`: pytest's monkeypatch.setattr in-process (undone after the test),
    the plain setattr in a subprocess that dies anyway.
    """
    from tadmerge.cluster.progress import Progress
    from tadmerge.io import publish
    from tadmerge.run import driver
    from tadmerge.run.state import RunState

    name, _, count = point.partition(":")
    fire = _nth(int(count) if count else 1, action)
    if name == "plan":
        _after(setattr_, driver, "make_plan", fire)
    elif name == "staging":
        _after(setattr_, RunState, "check_or_write_fingerprint", fire)
    elif name == "stats":
        _around_executor(setattr_, "map_stats", fire, after=True)
    elif name == "stats-saved":
        _after(setattr_, RunState, "save_stats", fire)
    elif name == "unit-written":
        _around_executor(setattr_, "run_units", fire, after=False)
    elif name == "progress":
        _after(setattr_, Progress, "update", fire)
    elif name == "units":
        _units_logged(setattr_, int(count) if count else 1, action)
    elif name == "finalize":
        _after(setattr_, driver, "finalize", fire)
    elif name == "publish":
        _before(setattr_, publish.Staging, "publish", fire)
    elif name == "before-manifest":
        _before(setattr_, publish, "write_manifest", fire)
    elif name == "after-manifest":
        _after(setattr_, publish, "write_manifest", fire)
    elif name == "before-rename":
        _before(setattr_, publish, "_rename_noreplace", fire)
        _before(setattr_, publish, "_rename_exchange", fire)
    elif name == "after-rename":
        _after(setattr_, publish, "_rename_noreplace", fire)
        _after(setattr_, publish, "_rename_exchange", fire)
    elif name == "before-state-removal":
        _state_removal(setattr_, publish, fire)
    elif name == "dance-between":
        # --overwrite where RENAME_EXCHANGE is unavailable: the old output moved
        # aside, the staging not yet renamed in
        _get(publish, "_rename_exchange")
        setattr_(publish, "_rename_exchange", lambda a, b: False)
        _before(setattr_, publish, "_rename_noreplace", fire)
    else:
        raise KillPointMissing(f"unknown kill point {point!r}")


POINTS = [
    "plan",
    "staging",
    "stats",
    "stats-saved",
    "unit-written",
    "units",
    "finalize",
    "publish",
    "before-manifest",
    "after-manifest",
    "before-rename",
    "after-rename",
    "before-state-removal",
]


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--at", required=True, help="kill point, NAME or NAME:N")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- tadmerge argv or SCRIPT.py ...")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("no command after --")
    sys.path.insert(0, REPO)  # this checkout's tadmerge, as `python merge.py` in it imports
    try:
        install(args.at, sigkill)
    except KillPointMissing as e:
        print(f"killpoints: {e}", file=sys.stderr)
        sys.exit(UNREACHABLE)
    if command[0].endswith(".py"):
        sys.argv = command
        runpy.run_path(command[0], run_name="__main__")
    else:
        from tadmerge.cli import run

        run(command)


if __name__ == "__main__":
    main(sys.argv[1:])
