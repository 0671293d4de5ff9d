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

from .keys import N_COARSE

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native_kernels.c")
FLAGS = ("-O3", "-std=c99", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math")
# kernels.RAW_CHUNK: the report's float64 lanes are per position in a chunk
CHUNK = 2048
# native_kernels.c's ZERO_SLOTS: coarse_side_raw's tables have these past N_COARSE
ZERO_SLOTS = 8
BUILD_TIMEOUT_S = 120

_LOCK = threading.Lock()
_state: dict = {}  # "lib": the loaded kernels, or None once they could not be had


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
            err = done.stderr.strip() or f"exit status {done.returncode}, no message"
        raise NativeUnavailable(f"{cmd[0]} failed on {SOURCE.name}: {err[-800:]}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> NativeKernels:
    try:
        path = build()
    except OSError:  # the cache is not writable: a private directory for this process
        private = Path(tempfile.mkdtemp(prefix="tadmerge-native-"))
        atexit.register(shutil.rmtree, private, True)
        path = build(private)
    try:
        return NativeKernels(ctypes.CDLL(str(path)))
    except (OSError, AttributeError):  # a cached file that does not load: built again
        path.unlink(missing_ok=True)
        return NativeKernels(ctypes.CDLL(str(build(path.parent))))


def kernels() -> NativeKernels | None:
    """The loaded library's kernels, built on first use; None where it cannot be had."""
    if "lib" in _state:
        return _state["lib"]
    with _LOCK:
        if "lib" not in _state:
            lib = None
            if not wanted():
                _state["why"] = "turned off (TADMERGE_NATIVE=0)"
            else:
                try:
                    lib = _load()
                except (NativeUnavailable, OSError) as e:
                    log.info("C kernels unavailable, numba or numpy instead: %s", e)
                    _state["why"] = str(e)
            _state["lib"] = lib
    return _state["lib"]


def describe() -> str:
    """Where the loaded library is, or why there is none (`tadmerge kernels`)."""
    k = kernels()
    if k is not None:
        return f"ready ({k.lib._name})"
    return f"unavailable: {_state.get('why', 'unknown')}"


def available() -> bool:
    return kernels() is not None


def preload() -> None:
    """Build or load the library in a background thread (a first build takes
    about a second: the compiler runs while the merge plans)."""
    if "lib" not in _state and wanted():
        threading.Thread(target=kernels, name="tadmerge-native", daemon=True).start()


def _ptr(x: np.ndarray, dtype, n: int | None = None) -> int | None:
    """The address of a flat contiguous array of `dtype` (None for an empty
    one: the output a kernel does not write)."""
    if x.dtype != dtype or not x.flags.c_contiguous or (n is not None and x.size != n):
        want = f"{n} entries of " if n is not None else ""
        raise TypeError(f"the C kernels take contiguous arrays of {want}{np.dtype(dtype)}")
    return x.ctypes.data if x.size else None


class NativeKernels:
    """The C kernels, called as numba's dispatchers of the same names are
    (kernels._Kernels): numpy arrays in, the same integers back."""

    def __init__(self, lib: ctypes.CDLL):
        p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
        signatures = {
            "stream_raw": [p, p, i64, i64, p, f32, f32, i32, p, p, p, p],
            "coarse_side_raw": [p, p, i64, p, p, p, i64],
            "tie_end_raw": [p, p, i64, i64, i64],
            "cut_combine_raw": [p, p, i64, i64, p, p, p, p, p, p, f32, f32, i32, p, p, p],
        }
        for name, args in signatures.items():
            fn = getattr(lib, f"tadmerge_{name}")
            fn.argtypes, fn.restype = args, i64
            setattr(self, f"_{name}", fn)
        self.lib = lib

    def stream_raw(self, base, tasks, w, lam, total_w, average, out16, out32, sq) -> int:
        n, k = base.size, len(tasks)
        lanes = np.zeros(k * CHUNK, np.float64)
        return self._stream_raw(
            _ptr(base, np.uint16), _tasks(tasks, n), k, n, _ptr(w, np.float32, k),
            float(lam), float(total_w), int(average), *_outs(out16, out32, n),
            _ptr(sq, np.float64, k), lanes.ctypes.data,
        )  # fmt: skip

    def coarse_side_raw(self, base, task, counts, counts2, side) -> int:
        # counts, counts2: N_COARSE + ZERO_SLOTS slots, the last for the zero keys
        # (bucket 0's: the caller adds them in, kernels.coarse_sparse_raw)
        n, slots = base.size, N_COARSE + ZERO_SLOTS
        return self._coarse_side_raw(
            _ptr(base, np.uint16), _ptr(task, np.uint16, n), n, _ptr(counts, np.int64, slots),
            _ptr(counts2, np.int64, slots), _ptr(side, np.int32), side.size,
        )  # fmt: skip

    def tie_end_raw(self, base, task, key, quota) -> int:
        n = base.size
        return self._tie_end_raw(
            _ptr(base, np.uint16), _ptr(task, np.uint16, n), n, int(key), int(quota)
        )

    def cut_combine_raw(
        self, base, tasks, lo_key, lo_end, hi_key, hi_end, scale, w, lam, total_w, average,
        out16, out32, kept,
    ) -> int:  # fmt: skip
        n, k = base.size, len(tasks)
        return self._cut_combine_raw(
            _ptr(base, np.uint16), _tasks(tasks, n), k, n, _ptr(lo_key, np.int64, k),
            _ptr(lo_end, np.int64, k), _ptr(hi_key, np.int64, k), _ptr(hi_end, np.int64, k),
            _ptr(scale, np.float32, k), _ptr(w, np.float32, k), float(lam), float(total_w),
            int(average), *_outs(out16, out32, n), _ptr(kept, np.int64, k),
        )  # fmt: skip


def _tasks(tasks, n: int):
    return (ctypes.c_void_p * len(tasks))(*(_ptr(t, np.uint16, n) for t in tasks))


def _outs(out16: np.ndarray, out32: np.ndarray, n: int) -> tuple[int | None, int | None]:
    """(bf16 patterns, None) or (None, float32): the output the kernel writes."""
    if out16.size:
        return _ptr(out16, np.uint16, n), None
    return None, _ptr(out32, np.float32, n)
