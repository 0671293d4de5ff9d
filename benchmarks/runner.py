"""Run one command as a subprocess and measure it from the outside.

    python benchmarks/runner.py --json out.json -- tadmerge merge cfg.yaml --out X

Measured, for the whole process tree the command starts:
- wall: time.perf_counter() around spawn .. reap;
- cpu: user + sys of the child and every descendant it waited for, from
  os.wait4's rusage (the per-child form of getrusage(RUSAGE_CHILDREN));
- peak RSS of the tree: a sampler thread reads /proc/PID/status of the
  child and all its descendants every `interval` seconds (50 ms) and keeps
  the maximum of the sum of VmRSS; the same for RssAnon (private anonymous
  memory: the part the kernel cannot drop, since RSS also counts the
  file-backed pages of memory-mapped inputs, which are reclaimable);
- hwm: the largest VmHWM seen (the kernel's own high-water mark of one
  process since its exec: catches spikes shorter than the sampling interval,
  but per process, not summed). wait4's ru_maxrss is recorded too but is NOT
  a measure of the tool: Linux carries the pre-exec high-water mark over
  execve, so it is at least the RSS of the (forked copy of the) launcher;
- optionally `flush_s`: after the command exits, fsync of every file of its
  output directory, so the cost of writing back the dirty pages a tool left
  behind is charged to that tool (see io_limit.py for why).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import fsync_tree, tool_env

PAGE = os.sysconf("SC_PAGE_SIZE")


def _children(pid: int) -> list[int]:
    """Direct children of pid, from /proc (no psutil needed; psutil is used when present)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def tree_pids(root: int) -> list[int]:
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(_children(pid))
    return out


def _status_kb(pid: int) -> tuple[int, int, int]:
    """(VmRSS, RssAnon, VmHWM) in bytes; zeros for a process that is gone."""
    rss = anon = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    return rss, anon, hwm


@dataclass
class Measurement:
    cmd: list[str]
    returncode: int = 0
    wall_s: float = 0.0
    user_s: float = 0.0
    sys_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss_bytes: int = 0  # max over samples of sum(VmRSS) over the tree
    peak_anon_bytes: int = 0  # max over samples of sum(RssAnon) over the tree
    hwm_bytes: int = 0  # max VmHWM seen: kernel high-water mark of the largest
    #                                  process since its exec (misses only the last ~50 ms)
    ru_maxrss_bytes: int = 0  # wait4's ru_maxrss: includes the pre-exec copy of the
    #                                  parent made by fork (Linux keeps it), so it is at least
    #                                  the size of the process that launched the tool
    max_procs: int = 0
    samples: int = 0
    flush_s: float | None = None
    loadavg_before: float | None = None  # 1-min load average (other users of the machine)
    loadavg_after: float | None = None
    stdout_tail: str = ""
    stderr_tail: str = ""
    timeline: list = field(default_factory=list)  # [(t, rss, anon)] every ~0.5 s

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class _Sampler(threading.Thread):
    def __init__(self, pid: int, interval: float, t0: float):
        super().__init__(daemon=True)
        self.pid, self.interval, self.t0 = pid, interval, t0
        self.stop = threading.Event()
        self.peak_rss = self.peak_anon = self.max_procs = self.samples = self.hwm = 0
        self.timeline: list = []
        self._next_tl = 0.0

    def sample(self) -> None:
        pids = tree_pids(self.pid)
        rss = anon = 0
        for p in pids:
            r, a, h = _status_kb(p)
            rss += r
            anon += a
            self.hwm = max(self.hwm, h)
        self.samples += 1
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_anon = max(self.peak_anon, anon)
        self.max_procs = max(self.max_procs, len(pids))
        t = time.perf_counter() - self.t0
        if t >= self._next_tl and rss:
            self.timeline.append((round(t, 2), rss, anon))
            self._next_tl = t + 0.5

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval)


def _tail(path: Path, n: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-n:].decode(errors="replace")


def measure(
    cmd: list[str],
    *,
    cwd: str | Path | None = None,
    env: dict | None = None,
    log_dir: Path | None = None,
    name: str = "run",
    interval: float = 0.05,
    flush_dir: Path | None = None,
    nice: int = 0,
    timeout: float | None = None,
) -> Measurement:
    """Run cmd to completion and measure it (see the module docstring)."""
    log_dir = Path(log_dir or "/tmp")
    log_dir.mkdir(parents=True, exist_ok=True)
    out_p, err_p = log_dir / f"{name}.stdout", log_dir / f"{name}.stderr"
    full_env = dict(tool_env(), **(env or {}))
    pre = (lambda: os.nice(nice)) if nice else None
    load0 = os.getloadavg()[0]
    with open(out_p, "wb") as fo, open(err_p, "wb") as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=fo, stderr=fe, preexec_fn=pre)
        sampler = _Sampler(proc.pid, interval, t0)
        sampler.start()
        timer = None
        if timeout:
            timer = threading.Timer(timeout, proc.kill)
            timer.start()
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        if timer:
            timer.cancel()
        sampler.stop.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    m = Measurement(
        cmd=[str(c) for c in cmd],
        returncode=proc.returncode,
        wall_s=wall,
        user_s=ru.ru_utime,
        sys_s=ru.ru_stime,
        cpu_s=ru.ru_utime + ru.ru_stime,
        peak_rss_bytes=sampler.peak_rss,
        peak_anon_bytes=sampler.peak_anon,
        hwm_bytes=sampler.hwm,
        ru_maxrss_bytes=ru.ru_maxrss * 1024,
        max_procs=sampler.max_procs,
        samples=sampler.samples,
        stdout_tail=_tail(out_p),
        stderr_tail=_tail(err_p),
        timeline=sampler.timeline,
        loadavg_before=load0,
        loadavg_after=os.getloadavg()[0],
    )
    if flush_dir is not None and m.ok and Path(flush_dir).exists():
        t1 = time.perf_counter()
        fsync_tree(Path(flush_dir))
        m.flush_s = time.perf_counter() - t1
    return m


def to_dict(m: Measurement, timeline: bool = False) -> dict:
    d = asdict(m)
    if not timeline:
        d.pop("timeline")
    return d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="measure one command (wall, cpu, peak RSS)")
    ap.add_argument("--json", type=Path, help="write the measurement here")
    ap.add_argument("--flush-dir", type=Path, help="fsync this directory after the command")
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    if not cmd:
        ap.error("no command given")
    m = measure(cmd, flush_dir=a.flush_dir, interval=a.interval)
    d = to_dict(m, timeline=True)
    text = json.dumps(d, indent=1)
    if a.json:
        a.json.write_text(text + "\n")
    print(
        json.dumps(
            {
                k: d[k]
                for k in (
                    "returncode",
                    "wall_s",
                    "cpu_s",
                    "peak_rss_bytes",
                    "peak_anon_bytes",
                    "hwm_bytes",
                    "flush_s",
                )
            }
        )
    )
    return m.returncode


if __name__ == "__main__":
    sys.exit(main())
