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

import numpy as np

from .keys import N_COARSE

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native_kernels.c")
FLAGS = ("-O3", "-std=c99", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math")
# native_kernels.c's CHUNK: the stream kernel's float64 lanes are per position in one
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
                    log.debug("C kernels unavailable: %s", e)  # (the driver warns)
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
    """The address of a contiguous array of `dtype` (of n entries, if given)."""
    if x.dtype != dtype or not x.flags.c_contiguous or (n is not None and x.size != n):
        want = f"{n} entries of " if n is not None else ""
        raise TypeError(f"the C kernels take contiguous arrays of {want}{np.dtype(dtype)}")
    return x.ctypes.data if x.size else None


class NativeKernels:
    """The C kernels (native_kernels.c) with their ctypes signatures: numpy
    arrays in (checked: dtype, contiguity, length), integers back. ctypes
    releases the GIL for each call, so worker threads run them in parallel."""

    def __init__(self, lib: ctypes.CDLL):
        p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
        f64 = ctypes.c_double
        signatures = {
            "stream": ([p, p, p, i64, i64, p, f32, f32, i32, p, i32, p, p], i64),
            "coarse_counts": ([p, i64, p, p], None),
            "coarse_moments": ([p, i64, p, p], None),
            "coarse_side": ([p, i64, p, p, p, i64], i64),
            "coarse_side_raw": ([p, p, i64, p, p, p, i64], i64),
            "fine_rows": ([p, i64, p, p, p], None),
            "tie_end": ([p, i64, i64, i64], i64),
            "tie_end_raw": ([p, p, i64, i64, i64], i64),
            "cut_pass": ([p, i64, i64, i64, i64, i64, f32, i32], i64),
            "cut_combine_raw": ([p, p, i64, i64, p, p, p, p, p, p, f32, f32, i32, p, i32, p], i64),
            "ties_votes": ([p, i64, i64, p, p], None),
            "ties_merge": ([p, i64, i64, p, p, f32, i32, i64, i32, p], None),
            "emr_merge": ([p, i64, i64, p, p, p], i64),
            "uniform_draws": ([p, i64, i64, i64, i64], None),
            "della_rows": ([p, p, i64, i64, f64, f64, f64, i32], i64),
            "ram_merge": ([p, i64, i64, p, f32, p, p], None),
            "ram_counts": ([p, i64, i64, f32, p], None),
            "signed_coarse": ([p, i64, p], None),
            "square_sum": ([p, i64], f64),
            "signed_fine": ([p, i64, p, p], None),
            "sums_range": ([p, p, p, p, i64, i64, p, p], None),
            "sums_accumulate": (
                [p, p, p, p, i64, i64, p, p, i64, i64, i64, i64, i32, i64, i64, p, p],
                i64,
            ),
        }
        for name, (args, restype) in signatures.items():
            fn = getattr(lib, f"tadmerge_{name}")
            fn.argtypes, fn.restype = args, restype
            setattr(self, f"_{name}", fn)
        self.lib = lib

    # -- task arithmetic and averaging without a sparsifier --------------------

    def stream(self, base, tasks, w, lam, total_w, average, out, sq) -> int:
        """base, tasks: flat arrays of STREAM_DTYPES; out: one too; sq: float64 × K."""
        n, k = base.size, len(tasks)
        dts = np.array([_dtype_code(x) for x in (base, *tasks)], np.int32)
        lanes = np.zeros(k * CHUNK, np.float64)
        return self._stream(
            _ptr(base, base.dtype), _arrays(tasks, None, n), dts.ctypes.data, k, n,
            _ptr(w, np.float32, k), float(lam), float(total_w), int(average),
            _ptr(out, out.dtype, n), _dtype_code(out), _ptr(sq, np.float64, k), lanes.ctypes.data,
        )  # fmt: skip

    # -- statistics ------------------------------------------------------------

    def coarse_counts(self, bits, counts, counts2) -> None:
        self._coarse_counts(
            _ptr(bits, np.int32), bits.size, _ptr(counts, np.int64, N_COARSE),
            _ptr(counts2, np.int64, N_COARSE),
        )  # fmt: skip

    def coarse_moments(self, bits, acc, acc2) -> None:
        """acc, acc2: (N_COARSE, 3) int64 (count, Σ L, Σ L² per bucket)."""
        self._coarse_moments(
            _ptr(bits, np.int32), bits.size, _ptr(acc, np.int64, 3 * N_COARSE),
            _ptr(acc2, np.int64, 3 * N_COARSE),
        )  # fmt: skip

    def coarse_side(self, bits, counts, counts2, side) -> int:
        """counts, counts2: N_COARSE + ZERO_SLOTS slots, the last for the zero
        keys (bucket 0's: the caller adds them in)."""
        slots = N_COARSE + ZERO_SLOTS
        return self._coarse_side(
            _ptr(bits, np.int32), bits.size, _ptr(counts, np.int64, slots),
            _ptr(counts2, np.int64, slots), _ptr(side, np.int32), side.size,
        )  # fmt: skip

    def coarse_side_raw(self, base, task, counts, counts2, side) -> int:
        """coarse_side of τ = fl32(task) − fl32(base) (bf16 patterns)."""
        n, slots = base.size, N_COARSE + ZERO_SLOTS
        return self._coarse_side_raw(
            _ptr(base, np.uint16), _ptr(task, np.uint16, n), n, _ptr(counts, np.int64, slots),
            _ptr(counts2, np.int64, slots), _ptr(side, np.int32), side.size,
        )  # fmt: skip

    def fine_rows(self, bits, lut, rows, rows2) -> None:
        """rows, rows2: (m + 1) × N_FINE int32 tables, rows[lut[bucket]] (may be one)."""
        size = rows.size
        self._fine_rows(
            _ptr(bits, np.int32), bits.size, _ptr(lut, np.int32, N_COARSE),
            _ptr(rows, np.int32), _ptr(rows2, np.int32, size),
        )  # fmt: skip

    def tie_end(self, bits, key, quota) -> int:
        return self._tie_end(_ptr(bits, np.int32), bits.size, int(key), int(quota))

    def tie_end_raw(self, base, task, key, quota) -> int:
        n = base.size
        return self._tie_end_raw(
            _ptr(base, np.uint16), _ptr(task, np.uint16, n), n, int(key), int(quota)
        )

    # -- the apply phase -------------------------------------------------------

    def cut_pass(self, t, lo_key, lo_end, hi_key, hi_end, scale, rescale) -> int:
        return self._cut_pass(
            _ptr(t, np.float32), t.size, int(lo_key), int(lo_end), int(hi_key), int(hi_end),
            float(scale), int(rescale),
        )  # fmt: skip

    def cut_combine_raw(
        self, base, tasks, lo_key, lo_end, hi_key, hi_end, scale, w, lam, total_w, average, out,
        kept,
    ) -> int:  # fmt: skip
        n, k = base.size, len(tasks)
        if out.dtype not in (np.uint16, np.float32):
            raise TypeError(f"cut_combine_raw writes bf16 patterns or float32, not {out.dtype}")
        return self._cut_combine_raw(
            _ptr(base, np.uint16), _arrays(tasks, np.uint16, n), k, n, _ptr(lo_key, np.int64, k),
            _ptr(lo_end, np.int64, k), _ptr(hi_key, np.int64, k), _ptr(hi_end, np.int64, k),
            _ptr(scale, np.float32, k), _ptr(w, np.float32, k), float(lam), float(total_w),
            int(average), _ptr(out, out.dtype, n), _dtype_code(out), _ptr(kept, np.int64, k),
        )  # fmt: skip

    def ties_votes(self, ts, w) -> tuple[int, int]:
        n, k = ts[0].size, len(ts)
        up_down = np.zeros(2, np.int64)
        self._ties_votes(
            _arrays(ts, np.float32, n), k, n, _ptr(w, np.float32, k), up_down.ctypes.data
        )
        return int(up_down[0]), int(up_down[1])

    def ties_merge(self, ts, w, base, scale, mean, majority, count_cancel) -> tuple[int, int, int]:
        n, k = ts[0].size, len(ts)
        out3 = np.zeros(3, np.int64)
        self._ties_merge(
            _arrays(ts, np.float32, n), k, n, _ptr(w, np.float32, k), _ptr(base, np.float32, n),
            float(scale), int(mean), int(majority), int(count_cancel), out3.ctypes.data,
        )  # fmt: skip
        return int(out3[0]), int(out3[1]), int(out3[2])

    def emr_merge(self, ts, masks, abs_t, abs_u) -> None:
        """masks: K × n bool (or uint8); abs_t, abs_u: K × 256 int64."""
        n, k = ts[0].size, len(ts)
        if masks.dtype not in (np.bool_, np.uint8) or masks.shape != (k, n):
            raise TypeError(f"emr_merge takes a {k} × {n} bool array of masks")
        if self._emr_merge(
            _arrays(ts, np.float32, n), k, n, _ptr(masks, masks.dtype),
            _ptr(abs_t, np.int64, 256 * k), _ptr(abs_u, np.int64, 256 * k),
        ):  # fmt: skip
            raise MemoryError("emr_merge: its tables of exact sums could not be allocated")

    # -- DARE/DELLA's random draws --------------------------------------------

    def uniform_draws(self, out, lo, c1, c2) -> None:
        """out: float32, the draws of entries lo .. lo + out.size - 1 (< 2**32)."""
        if not 0 <= lo <= (1 << 32) - out.size:
            raise ValueError("uniform_draws: the entries must lie below 2**32")
        self._uniform_draws(_ptr(out, np.float32), out.size, int(lo), int(c1), int(c2))

    # -- RAM and RAMPlus --------------------------------------------------------

    def ram_merge(self, ts, base, eps, lam, use_lam) -> None:
        """ts: K float32 arrays (the merge written over ts[0]); lam: float32 × K;
        use_lam: int8 × K."""
        n, k = base.size, len(ts)
        self._ram_merge(
            _arrays(ts, np.float32, n), k, n, _ptr(base, np.float32, n), float(eps),
            _ptr(lam, np.float32, k), _ptr(use_lam, np.int8, k),
        )  # fmt: skip

    def square_sum(self, x) -> float:
        """x: float32; Σ x² in float64."""
        return float(self._square_sum(_ptr(x, np.float32), x.size)) if x.size else 0.0

    def signed_coarse(self, bits, counts) -> None:
        """bits: int32 patterns of float32 values; counts: int64 × 2**16, added to."""
        self._signed_coarse(_ptr(bits, np.int32), bits.size, _ptr(counts, np.int64, 1 << 16))

    def signed_fine(self, bits, slot, rows) -> None:
        """slot: int32 × 2**16 (row of each coarse bucket); rows: int64 [R, 2**16]."""
        if slot.size != 1 << 16 or rows.ndim != 2 or rows.shape[1] != 1 << 16:
            raise TypeError("signed_fine takes 2**16 slots and rows of 2**16 counts")
        if int(slot.max()) >= rows.shape[0] or int(slot.min()) < 0:
            raise ValueError("signed_fine: a slot outside the rows")
        self._signed_fine(
            _ptr(bits, np.int32), bits.size, _ptr(slot, np.int32), _ptr(rows, np.int64, rows.size)
        )

    def ram_counts(self, ts, eps, counts) -> None:
        """ts: K float32 arrays; counts: int64 × 2K, added to."""
        n, k = ts[0].size, len(ts)
        self._ram_counts(
            _arrays(ts, np.float32, n), k, n, float(eps), _ptr(counts, np.int64, 2 * k)
        )

    # -- DELLA by rows ---------------------------------------------------------

    def della_rows(self, tau, u, m, lo, c, density, inverse) -> int:
        """tau (float32, rewritten with t), u (float32 draws): rows of m entries.
        Returns the kept count."""
        n = tau.size
        if m <= 0 or n % m:
            raise TypeError("della_rows takes whole rows of m entries")
        kept = self._della_rows(
            _ptr(tau, np.float32), _ptr(u, np.float32, n), n // m, m, float(lo), float(c),
            float(density), int(inverse),
        )  # fmt: skip
        if kept < 0:
            raise MemoryError("della_rows: its buffers could not be allocated")
        return kept

    # -- exact sums of products (engine/sums.py) --------------------------------

    def sums_range(self, vs, base, sub, lo, hi) -> None:
        """vs: flat arrays of STREAM_DTYPES of n entries (with sub[j]: fl32(vs[j] −
        base)); lo, hi: int32 per vector, updated to the least and greatest
        exponent field."""
        n, k = vs[0].size, len(vs)
        dts = _sums_dtypes(vs, base)
        self._sums_range(
            _arrays(vs, None, n), dts.ctypes.data, _base(base, n),
            _ptr(sub, np.int8, k), k, n, _ptr(lo, np.int32, k), _ptr(hi, np.int32, k),
        )  # fmt: skip

    def sums_accumulate(self, vs, base, sub, pi, pj, a, seg_size, n_seg, column, b0, hi, lo) -> int:
        """Adds a piece's binned products into hi, lo (int64 [pairs, n_seg, nb]);
        returns the pairs' count of non-finite entries."""
        n, k, s = vs[0].size, len(vs), pi.size
        if hi.ndim != 3 or hi.shape[:2] != (s, n_seg) or lo.shape != hi.shape:
            raise TypeError("sums_accumulate takes int64 tables [pairs, segments, bins]")
        if not n:
            return 0
        dts = _sums_dtypes(vs, base)
        got = self._sums_accumulate(
            _arrays(vs, None, n), dts.ctypes.data, _base(base, n),
            _ptr(sub, np.int8, k), k, n, _ptr(pi, np.int32, s), _ptr(pj, np.int32, s), s,
            int(a), int(seg_size), int(n_seg), int(column), int(b0), hi.shape[2],
            _ptr(hi, np.int64, hi.size), _ptr(lo, np.int64, lo.size),
        )  # fmt: skip
        if got < 0:
            raise MemoryError("sums_accumulate: its tile buffers could not be allocated")
        return got


# the dtypes a streamed block may have (native_kernels.c's codes, by position)
STREAM_DTYPES = (
    np.dtype(np.uint16),
    np.dtype(np.float16),
    np.dtype(np.float32),
    np.dtype(np.float64),
)


def _dtype_code(x: np.ndarray) -> int:
    """native_kernels.c's code of an array's dtype (uint16: bf16 patterns)."""
    try:
        return STREAM_DTYPES.index(x.dtype)
    except ValueError:
        raise TypeError(
            f"the C kernels take bf16, float16, float32 or float64, not {x.dtype}"
        ) from None


def _sums_dtypes(vs, base) -> np.ndarray:
    """The sums kernels' dtype codes: each vector's, then the base's."""
    codes = [_dtype_code(x) for x in vs]
    return np.array(
        [*codes, STREAM_DTYPES.index(np.float32) if base is None else _dtype_code(base)], np.int32
    )


def _base(base: np.ndarray | None, n: int) -> int | None:
    return None if base is None else _ptr(base, base.dtype, n)


def _arrays(arrays, dtype, n: int):
    """A C array of the arrays' addresses (each flat, contiguous, n entries;
    of `dtype`, or of its own dtype when None)."""
    ptrs = [_ptr(a, a.dtype if dtype is None else dtype, n) for a in arrays]
    return (ctypes.c_void_p * len(ptrs))(*ptrs)
