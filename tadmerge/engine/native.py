"""The C kernels: compiled once per machine with its C compiler, loaded with ctypes.

The one compiled CPU backend (engine/kernels.py calls it; the torch functions
of engine/ and methods/ are the reference). Why C and not numba, which the
kernels were written in before: a merge that took numba's kernels paid, before
the first of them ran, for importing numba and for the typing and lowering
registries its first cached kernel loads (~0.5 s, all of it Python holding the
GIL) and ~145 MB of RSS for numba and LLVM; the C library is a small shared
object that loads in about a millisecond once built, and its kernels ran as
fast or faster (docs/benchmarks.md).

Exactness. native_kernels.c is plain C99 float, double and integer
arithmetic in the order of the torch functions it stands for, compiled with
-ffp-contract=off (GCC otherwise contracts a*b + c into one FMA wherever the
target has one) and no -ffast-math: the same bytes and the same integers
(tests/test_engine_*.py hold them against the torch reference).

Building. `$CC` (default `cc`) with -O3 into TADMERGE_CACHE_DIR, else
$XDG_CACHE_HOME/tadmerge, else ~/.cache/tadmerge, named by a hash of the
source, the flags and the machine, so that a changed source is rebuilt and
the cache can be shared by machines of one architecture (on x86-64 Linux the
kernels are built for AVX-512, AVX2 and baseline x86-64, and the loader takes
what the CPU runs). A build writes a temporary file and renames it: processes
that build at once (the Ray workers of a node) never load half a library.
Where no compiler runs, the build fails or TADMERGE_NATIVE=0, `available()`
is False, `describe()` says why, and merges run the torch reference: the same
bytes, slower (the driver says so at WARNING, cluster/dispatch.py).
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

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native_kernels.c")
FLAGS = ("-O3", "-std=c99", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math")
# native_kernels.c's CHUNK: the stream kernel's float64 lanes are per position in one
CHUNK = 2048
# native_kernels.c's ZERO_SLOTS: coarse_side_raw's tables have these past N_COARSE
ZERO_SLOTS = 8
BUILD_TIMEOUT_S = 120

_LOCK = threading.Lock()
# "lib": the loaded kernels, or None once they could not be had; "why": why not;
# "preload": the one thread preload started
_state: dict = {}


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


def _load() -> ctypes.CDLL:
    try:
        path = build()
    except OSError:  # the cache is not writable: a private directory for this process
        private = Path(tempfile.mkdtemp(prefix="tadmerge-native-"))
        atexit.register(shutil.rmtree, private, True)
        path = build(private)
    try:
        return _typed(ctypes.CDLL(str(path)))
    except (OSError, AttributeError):  # a cached file that does not load: built again
        path.unlink(missing_ok=True)
        return _typed(ctypes.CDLL(str(build(path.parent))))


def kernels() -> ctypes.CDLL | None:
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
                    log.debug("C kernels unavailable: %s", e)  # (the driver warns)
                    _state["why"] = str(e)
            _state["lib"] = lib
    return _state["lib"]


def describe() -> str:
    """Where the loaded library is, or why there is none (`tadmerge kernels`)."""
    k = kernels()
    if k is not None:
        return f"ready ({k._name})"
    return f"unavailable: {_state.get('why', 'unknown')}"


def available() -> bool:
    return kernels() is not None


def preload() -> None:
    """Build or load the library in a background thread, at most one per process
    (a first build takes about a second: the compiler runs while the merge plans)."""
    thread = threading.Thread(target=kernels, name="tadmerge-native", daemon=True)
    # (dict.setdefault is atomic: of two callers at once, one starts its thread)
    if "lib" not in _state and wanted() and _state.setdefault("preload", thread) is thread:
        thread.start()


_p, _i64, _i32, _f32, _f64 = (
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_double,
)  # fmt: skip
# Each kernel's (argument types, result type): native_kernels.c's tadmerge_NAME.
# engine/kernels.py passes the arguments, checked (dtype, contiguity, length).
SIGNATURES = {
    "stream": ([_p, _p, _p, _i64, _i64, _p, _f32, _f32, _i32, _p, _i32, _p, _p], _i64),
    "coarse_counts": ([_p, _i64, _p, _p], None),
    "coarse_moments": ([_p, _i64, _p, _p], None),
    "coarse_side": ([_p, _i64, _p, _p, _p, _i64], _i64),
    "coarse_side_raw": ([_p, _p, _i64, _p, _p, _p, _i64], _i64),
    "fine_rows": ([_p, _i64, _p, _p, _p], None),
    "tie_end": ([_p, _i64, _i64, _i64], _i64),
    "tie_end_raw": ([_p, _p, _i64, _i64, _i64], _i64),
    "cut_pass": ([_p, _i64, _i64, _i64, _i64, _i64, _f32, _i32], _i64),
    "cut_combine_raw": (
        [_p, _p, _i64, _i64, _p, _p, _p, _p, _p, _p, _f32, _f32, _i32, _p, _i32, _p],
        _i64,
    ),
    "ties_votes": ([_p, _i64, _i64, _p, _p], None),
    "ties_merge": ([_p, _i64, _i64, _p, _p, _f32, _i32, _i64, _i32, _p], None),
    "emr_merge": ([_p, _i64, _i64, _p, _p, _p], _i64),
    "uniform_draws": ([_p, _i64, _i64, _i64, _i64], None),
    "della_rows": ([_p, _p, _i64, _i64, _f64, _f64, _f64, _i32], _i64),
    "ram_merge": ([_p, _i64, _i64, _p, _f32, _p, _p], None),
    "ram_counts": ([_p, _i64, _i64, _f32, _p], None),
    "signed_coarse": ([_p, _i64, _p], None),
    "signed_fine": ([_p, _i64, _p, _p], None),
    "square_sum": ([_p, _i64], _f64),
    "sums_range": ([_p, _p, _p, _p, _i64, _i64, _p, _p], None),
    "sums_accumulate": (
        [_p, _p, _p, _p, _i64, _i64, _p, _p, _i64, _i64, _i64, _i64, _i32, _i64, _i64, _p, _p],
        _i64,
    ),
}


def _typed(lib: ctypes.CDLL) -> ctypes.CDLL:
    """The library with each kernel's ctypes signature set (an AttributeError if
    one is missing: a stale or foreign file). ctypes releases the GIL for each
    call, so worker threads run the kernels in parallel."""
    for name, (args, restype) in SIGNATURES.items():
        fn = getattr(lib, f"tadmerge_{name}")
        fn.argtypes, fn.restype = args, restype
    return lib
