"""Where a merge's CPU goes, by library, with Linux perf (all threads, kernel included).

    python benchmarks/perf_profile.py --data /work/bench-data/llama-271M-k8-bf16 \
        --tasks 3 --method tadrop_ta --tag tadrop_ta-271M-k3

profile_merge.py (py-spy) says which Python line launched the work; it cannot
see the kernel's share (page-cache copies, maps, write-back) nor tell the
C kernels' time from the SHA-256's inside one wait. `perf record` samples
every thread of the real merge (the default workers, no profiler inside the
process), and `perf report --sort dso` splits the CPU by library: the C
kernels, the kernel, OpenSSL (the manifest's SHA-256), the Python
interpreter, numpy. The top symbols give the rest.

Needs `perf` (Debian: linux-perf) and perf_event_paranoid <= 2 or root.
Results: benchmarks/results/perf_TAG.json (docs/benchmarks.md quotes them).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, clear_output, tool_env, warm_cache, write_result
from benchmarks.profile_merge import add_merge_args, merge_tag, merge_to_profile

ROW = re.compile(r"^\s*(?P<share>\d+\.\d+)%\s+(?P<name>\S.*?)\s*$")

# libraries by what they do in a merge (the C kernels' file name holds a hash)
ROLES = (
    ("native-", "tadmerge C kernels (engine/native_kernels.c)"),
    ("[kernel.kallsyms]", "Linux kernel (page-cache copies, maps, write-back)"),
    ("libcrypto", "OpenSSL (the manifest's SHA-256)"),
    ("libpython", "Python interpreter"),
    ("_multiarray_umath", "numpy"),
    ("libc.so", "libc (memset, memcpy, malloc)"),
    ("libtorch", "torch"),
    ("numba", "numba"),
)


def role(dso: str) -> str:
    return next((what for key, what in ROLES if key in dso), dso)


def report(data: Path, sort: str, top: int) -> list[dict]:
    """perf report's rows (share of all samples, name), the top `top` of them."""
    cmd = ["perf", "report", "-i", str(data), "--no-children", "--sort", sort, "--stdio"]
    text = subprocess.run([*cmd, "-g", "none"], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in text.splitlines():
        m = ROW.match(line)
        if m and not line.lstrip().startswith("#"):
            rows.append({"share": float(m.group("share")) / 100, "name": m.group("name")})
    return rows[:top]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_merge_args(ap, "tadrop_ta")
    ap.add_argument("--freq", type=int, default=999, help="samples per second and CPU")
    ap.add_argument("--top", type=int, default=20)
    a = ap.parse_args(argv)
    if shutil.which("perf") is None:
        sys.exit("perf_profile: no perf here (Debian: apt-get install linux-perf)")

    tag = merge_tag(a)
    dirs, out, cfg, cmd = merge_to_profile(a, "perf")
    perf_data = REPO / "benchmarks" / "work" / f"perf_{tag}.data"
    warm_cache(dirs)
    subprocess.run(
        ["perf", "record", "-q", "-F", str(a.freq), "-g", "-o", str(perf_data), "--", *cmd],
        check=True,
        env=tool_env(),
    )
    clear_output(out)
    libraries = report(perf_data, "dso", a.top)
    by_role: dict[str, float] = {}
    for row in libraries:
        by_role[role(row["name"])] = by_role.get(role(row["name"]), 0.0) + row["share"]
    result = {
        "data": str(a.data.resolve()),
        "tasks": a.tasks,
        "method": a.method,
        "config": cfg,
        "perf_data": str(perf_data),
        "freq": a.freq,
        "by_role": dict(sorted(by_role.items(), key=lambda kv: -kv[1])),
        "libraries": libraries,
        "symbols": report(perf_data, "dso,sym", a.top),
    }
    path = write_result(f"perf_{tag}", result)
    for what, share in result["by_role"].items():
        print(f"{share:6.1%}  {what}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
