"""C kernels: compiled once per machine with its C compiler, loaded with ctypes.

Why not numba for these. A merge that takes numba's kernels pays, before the
first of them runs, for importing numba (~0.25 s) and for the typing and
lowering registries that its first cached kernel loads (~0.25 s), all of it
Python holding the GIL. Task arithmetic of a 271M-parameter model and three
fine-tunes from a warm page cache takes ~1.5 s in all on two cores: the
workers waited a third of it. The C library loads in about a millisecond once
built, and its kernel is also faster: 0.46 against numba's 0.71 ns per element
and task (benchmarks/kernel_costs.py).

Exactness. native_kernels.c is plain C99 float and double arithmetic in the
order of the numba kernel it stands for, compiled with -ffp-contract=off (GCC
otherwise contracts a*b + c into one FMA wherever the target has one) and no
-ffast-math: the same bytes and the same report norms
(tests/test_engine_native.py holds them against the reference and numba).

Building. `$CC` (default `cc`) with -O3 into TADMERGE_CACHE_DIR, else
$XDG_CACHE_HOME/tadmerge, else ~/.cache/tadmerge, named by a hash of the
source, the flags and the machine, so that a changed source is rebuilt and
the cache can be shared by machines of one architecture (on x86-64 Linux the
kernel is built for AVX-512, AVX2 and baseline x86-64, and the loader takes
what the CPU runs). A build writes a temporary file and renames it: processes
that build at once (the Ray workers of a node) never load half a library.
Where no compiler runs, the build fails or TADMERGE_NATIVE=0, `available()`
is False (said once in the log) and the callers take numba's kernel or numpy:
the same bytes, slower.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native_kernels.c")
FLAGS = ("-O3", "-std=c99", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math")
# kernels.RAW_CHUNK: the report's float64 lanes are per position in a chunk
CHUNK = 2048
BUILD_TIMEOUT_S = 120

_LOCK = threading.Lock()
_state: dict = {}  # "lib": the loaded library, or None once it could not be had


class NativeUnavailable(RuntimeError):
    """The C kernels cannot be built or loaded here (no compiler, a failed build)."""


def wanted() -> bool:
    """TADMERGE_NATIVE=0 (or false/no/off) turns the C kernels off."""
    return os.environ.get("TADMERGE_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    if d := os.environ.get("TADMERGE_CACHE_DIR"):
        return Path(d)
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "tadmerge"


def _compiler() -> list[str]:
    cc = shlex.split(os.environ.get("CC", "cc"))
    if not cc or shutil.which(cc[0]) is None:
        raise NativeUnavailable(f"no C compiler ({' '.join(cc) or 'CC is empty'} not found)")
    return cc


def library_path(directory: Path | None = None) -> Path:
    """Where the library for this source, compiler command and machine lives."""
    cc = _compiler()
    key = hashlib.sha256(SOURCE.read_bytes())
    key.update(repr((cc, FLAGS, platform.system(), platform.machine())).encode())
    return (directory or cache_dir()) / f"native-{key.hexdigest()[:16]}.so"


def build(directory: Path | None = None) -> Path:
    """The built library's path, built now if the cache has none."""
    path = library_path(directory)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + "-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        err = ""
        # with the per-CPU bodies first; a compiler without target_clones, without
        for extra in ((), ("-DTADMERGE_NO_CLONES",)):
            cmd = [*_compiler(), *FLAGS, *extra, "-o", tmp, str(SOURCE)]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise NativeUnavailable(f"{cmd[0]} did not run: {e}") from e
            if done.returncode == 0:
                os.replace(tmp, path)
                return path
            err = done.stderr.strip()
        raise NativeUnavailable(f"{' '.join(cmd[:1])} failed on {SOURCE.name}: {err[-800:]}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL:
    try:
        path = build()
    except OSError:  # the cache is not writable: a private directory for this process
        private = Path(tempfile.mkdtemp(prefix="tadmerge-native-"))
        atexit.register(shutil.rmtree, private, True)
        path = build(private)
    lib = ctypes.CDLL(str(path))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    f = lib.tadmerge_stream_raw
    f.restype = i64
    f.argtypes = [p, p, i64, i64, p, ctypes.c_float, ctypes.c_float, ctypes.c_int, p, p, p, p]
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded library, built on first use; None where it cannot be had."""
    if "lib" in _state:
        return _state["lib"]
    with _LOCK:
        if "lib" not in _state:
            lib = None
            if wanted():
                try:
                    lib = _load()
                except (NativeUnavailable, OSError) as e:
                    log.info("C kernels unavailable, numba or numpy instead: %s", e)
            _state["lib"] = lib
    return _state["lib"]


def available() -> bool:
    return library() is not None


def preload() -> None:
    """Build or load the library in a background thread (a first build takes
    about a second: the compiler runs while the merge plans)."""
    if "lib" not in _state and wanted():
        threading.Thread(target=library, name="tadmerge-native", daemon=True).start()


def _flat(x: np.ndarray, dtype, n: int, what: str) -> int:
    if x.dtype != dtype or x.size != n or not x.flags.c_contiguous:
        raise TypeError(f"{what}: a contiguous {np.dtype(dtype)} array of {n} entries expected")
    return x.ctypes.data


def stream_raw(
    base: np.ndarray,
    tasks: list[np.ndarray],
    weights: list[float],
    scale: float,
    average: bool,
    out: np.ndarray,
) -> list[float] | None:
    """kernels.stream_raw in C: task arithmetic (or averaging) of bf16 blocks
    (uint16 arrays of their patterns) into `out` (uint16 for bf16, or float32).
    Returns Σ τ_k² per task (float64 lanes, numba's sums to the bit), or None
    when a result is NaN (`out` is then garbage). The library must be
    available()."""
    lib = library()
    if lib is None:
        raise NativeUnavailable("the C kernels are not available")
    n, k = base.size, len(tasks)
    ptrs = (ctypes.c_void_p * k)(*(_flat(t, np.uint16, n, "task") for t in tasks))
    out16 = _flat(out, np.uint16, n, "out") if out.dtype == np.uint16 else None
    out32 = None if out16 is not None else _flat(out, np.float32, n, "out")
    w = np.asarray(weights, np.float32)
    sq = np.zeros(k, np.float64)
    lanes = np.zeros(k * CHUNK, np.float64)
    nan = lib.tadmerge_stream_raw(
        _flat(base, np.uint16, n, "base"), ptrs, k, n, w.ctypes.data,
        float(np.float32(scale)), float(np.float32(sum(weights))), int(average),
        out16, out32, sq.ctypes.data, lanes.ctypes.data,
    )  # fmt: skip
    return None if nan else [float(v) for v in sq]
