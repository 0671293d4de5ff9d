"""Small helpers shared by the benchmark scripts: sizes, checkpoint file lists,
a streaming safetensors writer (header first, then bytes), page-cache warm-up,
JSON results.

Kept free of tadmerge imports on purpose: the benchmarks measure the tool from
the outside, through its command line, the same way they measure mergekit.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
DEFAULT_DATA = Path(os.environ.get("BENCH_DATA", "/work/bench-data"))
# The other tools' virtual environments (benchmarks/setup_envs.sh): .bench-envs/ in the
# repository (git-ignored, like .venv), or BENCH_ENVS. One tool's python can also be named
# directly: TADMERGE_MERGEKIT_PYTHON, TADMERGE_FUSIONBENCH_PYTHON.
DEFAULT_ENVS = Path(os.environ.get("BENCH_ENVS") or REPO / ".bench-envs")
TOOLS = {  # env name: (import name, pip spec setup_envs.sh installs, python override)
    "mergekit": ("mergekit", "mergekit==0.1.5", "TADMERGE_MERGEKIT_PYTHON"),
    "fusionbench": ("fusion_bench", "fusion-bench==0.2.33", "TADMERGE_FUSIONBENCH_PYTHON"),
}


def tool_python(tool: str) -> Path:
    """The python of `tool`'s environment: $TADMERGE_<TOOL>_PYTHON, else the one
    benchmarks/setup_envs.sh builds (DEFAULT_ENVS/<tool>/bin/python)."""
    override = os.environ.get(TOOLS[tool][2])
    return Path(override) if override else DEFAULT_ENVS / tool / "bin" / "python"


def tool_missing(tool: str, test_file: str) -> str | None:
    """None when `tool` can be run, else why not and the exact commands that fix it
    (a test's skip reason)."""
    module, spec, var = TOOLS[tool]
    py = tool_python(tool)
    if not py.exists():
        why = f"{var}={py}: no such file" if os.environ.get(var) else f"no {py}"
    else:
        probe = f"import importlib.util,sys; sys.exit(importlib.util.find_spec('{module}') is None)"
        r = subprocess.run([str(py), "-c", probe], capture_output=True)
        if r.returncode == 0:
            return None
        why = f"{py} cannot import {module}"
    unset = f"unset {var} && " if os.environ.get(var) else ""
    return (
        f"{tool} not available ({why}). To run this test: cd {REPO} && {unset}"
        f"bash benchmarks/setup_envs.sh {tool} && python -m pytest -q {test_file} "
        f"(builds {DEFAULT_ENVS / tool} with torch==2.13.0 and {spec}; or set {var} to the "
        f"python of an environment that has {spec})"
    )


_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9, "T": 10**12}
_BYTE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_count(text: str | int | float) -> int:
    """'100M' -> 100_000_000, '1.5B' -> 1_500_000_000 (B = billion here)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGBT]?)\s*", str(text).upper())
    if not m:
        raise ValueError(f"cannot parse a count from {text!r} (try 100M, 1.5B)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def parse_bytes(text: str | int) -> int:
    """'2GB' -> 2e9, '512MiB' -> 2**29."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?I?B)?\s*", str(text).upper())
    if not m:
        raise ValueError(f"cannot parse a byte size from {text!r} (try 2GB, 512MiB)")
    return int(float(m.group(1)) * _BYTE_UNITS[m.group(2) or "B"])


def human_count(n: int) -> str:
    for unit, div in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


# ---------------------------------------------------------------- safetensors

ST_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def safetensors_header(
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict | None = None
) -> tuple[bytes, list[tuple[int, int]]]:
    """Header bytes (8-byte length + JSON padded to 8) and each tensor's
    [start, end) offsets relative to the start of the data section."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offsets = []
    pos = 0
    for name, dtype, shape in entries:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": ST_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [pos, pos + nbytes],
        }
        offsets.append((pos, pos + nbytes))
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


class StreamingShardWriter:
    """Writes one safetensors file whose tensors arrive in order, in row
    chunks, without ever holding a whole tensor: the header is written first
    from the known names/shapes, then the bytes are appended."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        self.path = Path(path)
        self.entries = entries
        head, self.offsets = safetensors_header(entries)
        self.data_start = len(head)
        self.expected = self.data_start + (self.offsets[-1][1] if self.offsets else 0)
        self.f = open(self.path, "wb")
        self.f.write(head)

    def write(self, chunk: torch.Tensor) -> None:
        self.f.write(chunk.contiguous().view(torch.uint8).numpy())

    def close(self) -> None:
        size = self.f.tell()
        self.f.close()
        if size != self.expected:
            raise RuntimeError(f"{self.path}: wrote {size} bytes, header promised {self.expected}")


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of an HF-layout directory (sharded or not)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors files in {model_dir}")
    return files


def clear_output(out: Path) -> None:
    """Remove a merge output and the staging directory an interrupted tadmerge run
    may have left beside it (which would otherwise refuse the next run)."""
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.parent / f".{out.name}.tadmerge-staging", ignore_errors=True)


def dir_bytes(path: Path, suffix: str = ".safetensors") -> int:
    return sum(p.stat().st_size for p in Path(path).rglob(f"*{suffix}") if p.is_file())


def read_files(paths, block: int = 16 << 20) -> int:
    """Read every byte of every file once (sequential, unbuffered-ish)."""
    total = 0
    buf = bytearray(block)
    view = memoryview(buf)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                total += n
    return total


def warm_cache(model_dirs) -> int:
    """Bring the inputs into the page cache, so that every measured run of
    every tool starts from the same (warm) condition."""
    return read_files([f for d in model_dirs for f in checkpoint_files(d)])


def drop_caches() -> None:
    """Empty the page cache (Linux, root): the next reads come from disk."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
    except OSError as exc:
        raise SystemExit(f"--cold needs root to drop the page cache: {exc}") from None


def fsync_tree(path: Path) -> int:
    """fsync every regular file under path (and the directories); returns
    the number of files. Used after a tool exits, so that the dirty pages a
    tool left behind are paid for by the tool's measurement and not by the
    next run."""
    n = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            n += 1
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return n


# ---------------------------------------------------------------- results


def tool_env() -> dict[str, str]:
    """The environment the measured tools run in: this one, with bytecode caching.

    Tools run as installed, their compiled bytecode cached. A sandbox that sets
    PYTHONDONTWRITEBYTECODE would make every run recompile the modules that pip
    did not compile at install time (an editable install's: 0.3 s of tadmerge's).
    """
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def machine_info() -> dict:
    import psutil

    info = {
        "hostname": platform.node(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "mem_total_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "bytecode_cache": "written and used (PYTHONDONTWRITEBYTECODE dropped for the tools)",
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def git_rev() -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def code_version() -> str | None:
    """HEAD plus a hash of uncommitted changes under tadmerge/ ("abc123+d41d8c" when
    dirty): stamped on every measured run, since the engine may change between runs."""
    rev = git_rev()
    if rev is None:
        return None
    try:
        diff = subprocess.run(
            ["git", "-C", str(REPO), "diff", "HEAD", "--", "tadmerge"],
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return rev
    if not diff:
        return rev
    import hashlib

    return f"{rev}+{hashlib.sha1(diff).hexdigest()[:6]}"


def write_result(name: str, payload: dict, results_dir: Path = RESULTS_DIR) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_rev": git_rev(),
        "machine": machine_info(),
        **payload,
    }
    path = results_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=False, default=str) + "\n")
    tmp.replace(path)
    return path


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])
