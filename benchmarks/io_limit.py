"""The I/O limit of a merge, measured on the same files as the merge itself.

    python benchmarks/io_limit.py /work/bench-data/llama-271M-k3-bf16 [--reps 3]

A merge of K fine-tunes must at least read every byte of the K+1 input
checkpoints once and write the merged checkpoint once. This script does exactly
that and nothing else, single-threaded, with the simplest fast primitives:
sequential `readinto` of 16 MiB blocks into one reused buffer, and sequential
`write` of 16 MiB blocks followed by `fsync`. The output file has the size of
the merged model (the base checkpoint's bytes: the merge keeps the base dtype)
and is written on the same filesystem as the tools write their outputs.

Page cache. The machine has 24 GB of RAM and the benchmark inputs (a few GB)
fit in it, so every measurement here is WARM-cache: before each measured run
(of this script and of every tool) the inputs are read once (`warm_cache`), so
"read" means copying from the page cache, the same condition for every tool
compared. Writes go to the page cache and are then forced to disk: this script
fsyncs, and the runner fsyncs a tool's output directory after the tool exits
(`flush_s`), so both sides pay the write-back. Reported:

  read_s   reading all inputs once (warm)
  write_s  writing the output bytes (to the page cache)
  fsync_s  forcing them to disk
  total_s  read_s + write_s + fsync_s      <- "the I/O limit"

and, with --direct (compare_mergekit.py measures it once per run):

  read_direct_s  reading all inputs once with O_DIRECT, bypassing the page
                 cache: what one more pass over the inputs costs on a cold
                 machine (the disk's sequential read rate), the yardstick for
                 "TADrop's statistics add at most one more read of the inputs".
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import checkpoint_files, median, read_files, warm_cache

BLOCK = 16 << 20


def model_dirs(data: Path) -> list[Path]:
    """base + ft_* of a generated set (see make_checkpoints.py)."""
    data = Path(data)
    manifest = json.loads((data / "manifest.json").read_text())
    return [data / m for m in manifest["models"]]


def write_bytes(path: Path, nbytes: int) -> tuple[float, float]:
    """Write nbytes to path, then fsync: (write seconds, fsync seconds)."""
    buf = bytearray(os.urandom(1 << 20)) * (BLOCK >> 20)
    view = memoryview(buf)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, view[: min(left, BLOCK)])
        t1 = time.perf_counter()
        os.fsync(fd)
        t2 = time.perf_counter()
    finally:
        os.close(fd)
    return t1 - t0, t2 - t1


def read_direct(paths, block: int = BLOCK) -> tuple[int, float] | None:
    """Read the files with O_DIRECT (page cache bypassed): (bytes, seconds),
    or None where the filesystem refuses O_DIRECT."""
    flag = getattr(os, "O_DIRECT", None)
    if flag is None:
        return None
    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT requires
    total = 0
    t0 = time.perf_counter()
    try:
        for p in paths:
            fd = os.open(p, os.O_RDONLY | flag)
            try:
                while True:
                    n = os.readv(fd, [buf])
                    total += n
                    if n < block:
                        break
            finally:
                os.close(fd)
    except OSError:
        return None
    finally:
        buf.close()
    return total, time.perf_counter() - t0


def measure_once(dirs: list[Path], out_dir: Path, warm: bool = True, direct: bool = False) -> dict:
    inputs = [f for d in dirs for f in checkpoint_files(d)]
    out_bytes = sum(f.stat().st_size for f in checkpoint_files(dirs[0]))
    if warm:
        warm_cache(dirs)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "io_limit.bin"
    t0 = time.perf_counter()
    in_bytes = read_files(inputs, BLOCK)
    read_s = time.perf_counter() - t0
    write_s, fsync_s = write_bytes(target, out_bytes)
    target.unlink()
    total = read_s + write_s + fsync_s
    extra = {}
    if direct:
        got = read_direct(inputs)
        if got:
            extra = {"read_direct_s": got[1], "read_direct_bytes_per_s": got[0] / got[1]}
        warm_cache(dirs)  # leave the cache as the next measured run expects it
    return {
        **extra,
        "input_bytes": in_bytes,
        "output_bytes": out_bytes,
        "read_s": read_s,
        "write_s": write_s,
        "fsync_s": fsync_s,
        "total_s": total,
        "total_nofsync_s": read_s + write_s,
        "read_bytes_per_s": in_bytes / read_s if read_s else None,
        "write_bytes_per_s": out_bytes / (write_s + fsync_s) if write_s + fsync_s else None,
        "bytes_per_s": (in_bytes + out_bytes) / total if total else None,
    }


def summarize(runs: list[dict]) -> dict:
    keys = (
        "read_s",
        "write_s",
        "fsync_s",
        "total_s",
        "total_nofsync_s",
        "read_bytes_per_s",
        "write_bytes_per_s",
        "bytes_per_s",
    )
    out = {k: median([r[k] for r in runs]) for k in keys}
    direct = [r["read_direct_s"] for r in runs if r.get("read_direct_s")]
    if direct:
        out["read_direct_s"] = median(direct)
    out["input_bytes"] = runs[0]["input_bytes"]
    out["output_bytes"] = runs[0]["output_bytes"]
    out["reps"] = len(runs)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="measure the I/O limit of merging a generated set")
    ap.add_argument("data", type=Path, help="directory made by make_checkpoints.py")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out-dir", type=Path, help="where to write (default DATA/out)")
    ap.add_argument("--cold", action="store_true", help="skip the warm-up read")
    ap.add_argument("--direct", action="store_true", help="also time an O_DIRECT read")
    a = ap.parse_args(argv)
    dirs = model_dirs(a.data)
    runs = [
        measure_once(dirs, a.out_dir or a.data / "out", warm=not a.cold, direct=a.direct)
        for _ in range(a.reps)
    ]
    print(json.dumps({"runs": runs, "median": summarize(runs)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
