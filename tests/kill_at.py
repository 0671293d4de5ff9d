"""Run the `tadmerge` CLI and kill it (os._exit(137): kill -9, no cleanup) at one point.

Test-only: production code has no fault hooks; this wrapper monkeypatches the
function at the kill point, then calls tadmerge.cli.run. Usage:

    python tests/kill_at.py POINT -- ARGS...      (ARGS as for `tadmerge`)

POINT:
  units=N              once N unit records are in units.jsonl (a batch per unit)
  before-rename        publish: manifest written, staging not renamed/exchanged yet
  after-rename         publish: renamed (or swapped) into place, nothing after it
  before-state-removal publish: in place, an --overwrite's old output renamed aside,
                       .tadmerge/ still in the output
  dance-between        publish --overwrite where RENAME_EXCHANGE is unavailable:
                       the old output renamed aside, staging not renamed in yet
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tadmerge.io.publish as publish  # noqa: E402
from tadmerge.cli import run  # noqa: E402


def die(*_a, **_kw):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(137)


def then_die(fn):
    def wrapped(*a, **kw):
        result = fn(*a, **kw)
        die()
        return result

    return wrapped


def main() -> None:
    point = sys.argv[1]
    args = sys.argv[sys.argv.index("--") + 1 :]
    if point.startswith("units="):
        from tadmerge.cluster import integrity

        n = int(point.split("=", 1)[1])
        integrity.FLUSH_INTERVAL_S = 0.0
        real = integrity.UnitLog._write_batch

        def write_batch(self):
            real(self)
            with open(self.path, "rb") as f:
                if f.read().count(b"\n") >= n:
                    die()

        integrity.UnitLog._write_batch = write_batch
    elif point == "before-rename":
        publish._rename_noreplace = die
        publish._rename_exchange = die
    elif point == "after-rename":
        publish._rename_noreplace = then_die(publish._rename_noreplace)
        publish._rename_exchange = then_die(publish._rename_exchange)
    elif point == "before-state-removal":
        real_rmtree = publish.shutil.rmtree

        def rmtree(path, *a, **kw):
            if os.path.basename(path) == publish.STATE_DIR:
                die()
            return real_rmtree(path, *a, **kw)

        publish.shutil.rmtree = rmtree
    elif point == "dance-between":
        publish._rename_exchange = lambda a, b: False
        publish._rename_noreplace = die
    else:
        raise SystemExit(f"unknown kill point {point}")
    run(args)


if __name__ == "__main__":
    main()
