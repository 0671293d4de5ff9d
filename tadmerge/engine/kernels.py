"""The compiled CPU kernels: the engine's statistics and apply passes in C.

Each function here computes what a torch function of the engine computes (the
reference: engine/exact.py, histogram.py, sparsify.py, combine.py and the
methods' block functions), with the same float32 operations in the same
order, so the output bytes and the exact integers (histograms, exact sums) do
not depend on which ran: tests/test_engine_chunks.py, test_engine_raw.py,
test_engine_native.py and test_engine_stream.py hold the two together.

- Statistics (exact.coarse_stats, histogram.fine_histograms): integer
  histograms of the magnitude keys in one loop over the float32 bits (torch:
  a chain of whole-tensor ops per chunk).
- The apply phase: a resolved selection applied to a whole block (cut_block),
  TIES (ties_votes, ties_merge) and EMR (emr_merge) on a whole block, each one
  pass instead of ten or more chunked torch ops.
- Raw bf16 blocks (engine/raw.py): τ = fl32(θ_k) − fl32(θ_0) made in registers
  from the 16-bit patterns, never stored (coarse_sparse_raw, tie_end_raw,
  cut_combine_raw).
- Task arithmetic and averaging (and linear with normalize, the same math)
  without a sparsifier (stream): one pass per
  task over the inputs in their own dtypes (bf16, float16, float32, float64),
  the result rounded to the output dtype as torch rounds.
- DARE/DELLA's draws (uniform_draws): the counter-based hash of
  sparsify._hash_into in uint32 arithmetic, one pass instead of ~25 int64 ops.
- RAM and RAMPlus (ram_merge): the moved counts, the parts and their sum per
  entry in registers, instead of ~5 chunked torch ops per task.
- DELLA by rows (della_rows): each row's ranks by a stable radix sort, then the
  keep probabilities, the draw comparison and the rescale in one pass, instead
  of a stable torch sort per row and float64 tensors.
- RAMPlus' shared and unique counts (ram_counts), a signed score's order-key
  histograms (signed_coarse, signed_fine) and the report's float64 Σx²
  (square_sum): one pass each, where torch makes temporaries per chunk.
- The exact tensor sums of the spherical methods and model_stock
  (sums.exact_sums: sums_range, sums_accumulate): each product's mantissa
  product split and added to its (pair, segment, exponent) bin in int64, the
  reference's integers bin for bin, in one pass instead of ~20 int64 and
  bincount ops per pair and chunk.

The kernels live in native_kernels.c, built once per machine with its C
compiler and loaded with ctypes (engine/native.py); each function here checks
what it hands a kernel (dtype, contiguity, length: a wrong array is a
TypeError, never a read past its end) and calls it. The backend is decided
once per merge by the driver (cluster/dispatch.py) and passed explicitly to
every worker (the Dispatch), and from there to the engine (BlockContext.backend,
the `backend` argument of the statistics functions): 'c' takes the kernels
wherever they load, 'torch' never, 'auto' (a caller outside a merge: a test, a
benchmark) where they load. No module state switches it. Where the library
cannot be built or loaded the torch reference runs, with the same bytes (the
driver says so once, at WARNING; so does a worker told 'c' whose machine cannot
load it).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import TYPE_CHECKING

import numpy as np

from . import native
from .keys import N_COARSE, N_FINE

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Elements per kernel call: Σ L² per bucket stays below 2**62 in int64.
PIECE = 1 << 30
# up to this many wanted buckets the fine kernel keeps one table per stream
TWO_STREAM_ROWS = 8
# the dtypes a streamed block may have, by their code in native_kernels.c
# (bf16 as its uint16 patterns)
STREAM_DTYPES = tuple(np.dtype(t) for t in (np.uint16, np.float16, np.float32, np.float64))

# What a merge's dispatch may say: 'c' or 'torch' (cluster/dispatch.py decides,
# the workers are handed it); 'auto' is 'c' where the library loads, for callers
# outside a merge (tests, benchmarks).
BACKENDS = ("auto", "c", "torch")


def check_backend(name: str) -> str:
    """`name` if it is one of BACKENDS, else ValueError."""
    if name not in BACKENDS:
        raise ValueError(f"kernels backend must be one of {', '.join(BACKENDS)}, not {name!r}")
    return name


def preload(backend: str) -> None:
    """Build or load the library in a background thread (cluster/worker.py)."""
    if check_backend(backend) != "torch":
        native.preload()


def load() -> bool:
    """Build or load the library now; whether the kernels run in this process."""
    return enabled(None, "auto")


def enabled(x: torch.Tensor | np.ndarray | None, backend: str) -> bool:
    """Whether the C kernels take `x` (a tensor or numpy array on the CPU, or
    None: a CPU block that was never stored, as keys.SparseKeys of the raw
    bf16 path) under `backend` (the merge's, as its dispatch says): it is not
    torch and the library is loaded (built on first use, ~1 ms once cached).
    Else the caller runs the torch reference."""
    if check_backend(backend) == "torch" or not _on_cpu(x):
        return False
    if native.available():
        return True
    if backend == "c":
        _say_unavailable()
    return False


@functools.cache
def _say_unavailable() -> None:
    """The one WARNING of a process told 'c' whose library would not load (a
    worker on a machine other than the driver's)."""
    log.warning(
        "C kernels unavailable in this process (%s): the torch reference runs, with the same bytes",
        native.describe(),
    )


def _lib() -> ctypes.CDLL:
    lib = native.kernels()
    if lib is None:
        raise RuntimeError(f"the C kernels are not loaded: {native.describe()}")
    return lib


def _on_cpu(x) -> bool:
    """A torch tensor on the CPU, a numpy array, or None (no values held)."""
    device = getattr(x, "device", "cpu")  # numpy arrays say "cpu" too
    return getattr(device, "type", device) == "cpu"


def _ptr(x: np.ndarray, n: int | None = None) -> int | None:
    """The address of a contiguous array (of n entries, where given), for a kernel."""
    if not x.flags.c_contiguous or (n is not None and x.size != n):
        want = f"{n} entries of " if n is not None else ""
        raise TypeError(f"the C kernels take contiguous arrays of {want}{x.dtype}")
    return x.ctypes.data if x.size else None


def _arrays(arrays: list[np.ndarray], n: int):
    """A C array of the arrays' addresses (each flat and contiguous, of n entries)."""
    ptrs = [_ptr(a, n) for a in arrays]
    return (ctypes.c_void_p * len(ptrs))(*ptrs)


def _bits(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """The 32-bit patterns of a float32 (or int32 key) tensor or array, flat,
    without a copy."""
    if isinstance(x, np.ndarray):
        if x.dtype not in (np.float32, np.int32):
            raise TypeError(f"statistics kernels take float32 values or int32 keys, not {x.dtype}")
        return np.ascontiguousarray(x).reshape(-1).view(np.int32)
    import torch

    x = x.reshape(-1)
    if not x.is_contiguous():
        x = x.contiguous()
    if x.dtype == torch.float32:
        x = x.view(torch.int32)
    elif x.dtype != torch.int32:
        raise TypeError(f"statistics kernels take float32 values or int32 keys, not {x.dtype}")
    return x.numpy()


def _flat32(x: torch.Tensor) -> np.ndarray:
    """A contiguous flat float32 tensor as a numpy array sharing its memory."""
    import torch

    if x.dtype != torch.float32 or not x.is_contiguous():
        raise TypeError("the apply kernels take contiguous float32 tensors")
    return x.view(-1).numpy()


def _raw16(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """The 16-bit patterns of a flat contiguous bf16 tensor (or a uint16 array
    of them), without a copy."""
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint16 or not x.flags.c_contiguous:
            raise TypeError("the raw kernels take contiguous arrays of bf16 patterns (uint16)")
        return x.reshape(-1)
    import torch

    if x.dtype != torch.bfloat16 or not x.is_contiguous():
        raise TypeError("the raw kernels take contiguous bfloat16 tensors")
    return x.view(-1).view(torch.int16).numpy().view(np.uint16)


def _dtype_code(x: np.ndarray) -> int:
    """native_kernels.c's code of an array's dtype (uint16: bf16 patterns)."""
    try:
        return STREAM_DTYPES.index(x.dtype)
    except ValueError:
        raise TypeError(
            f"the C kernels take bf16, float16, float32 or float64, not {x.dtype}"
        ) from None


# ---------------------------------------------------------------------------------
# statistics: histograms of magnitude keys (engine/exact.py, histogram.py)
# ---------------------------------------------------------------------------------


def coarse_pieces(x: torch.Tensor, moments: int):
    """Per coarse bucket of |x|'s key: count, Σ L (moments >= 1) and Σ L² (moments
    2), int64, zeros for the moments not asked for (as the torch path leaves them),
    for each piece of at most PIECE elements (every sum stays below 2**62)."""
    lib = _lib()
    bits = _bits(x)
    for a in range(0, max(1, bits.shape[0]), PIECE):
        piece = bits[a : a + PIECE]
        if moments:
            acc = np.zeros((2, N_COARSE, 3), np.int64)  # two streams: count, Σ L, Σ L²
            lib.tadmerge_coarse_moments(_ptr(piece), piece.size, _ptr(acc[0]), _ptr(acc[1]))
            tot = acc[0] + acc[1]
            if moments < 2:
                tot[:, 2] = 0
            yield tot[:, 0].copy(), tot[:, 1].copy(), tot[:, 2].copy()
        else:
            counts = np.zeros((2, N_COARSE), np.int64)
            lib.tadmerge_coarse_counts(_ptr(piece), piece.size, _ptr(counts[0]), _ptr(counts[1]))
            zero = np.zeros(N_COARSE, np.int64)
            yield counts[0] + counts[1], zero, zero.copy()


# keys with low bits set are kept aside while they number at most n / SIDE_SHARE
SIDE_SHARE = 16


def coarse_sparse(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
    """(counts per coarse bucket, the keys whose low 16 bits are not all zero) of
    |x|, in one pass; None when those keys are more than n / SIDE_SHARE (or the
    input is longer than PIECE), with at most that many entries' work wasted.

    On bf16 task vectors ~1% of the keys have low bits set (a difference of two
    bf16 values has few significant bits): the rest add nothing to the moments
    Σ L, Σ L² and fall in fine bin 0, so the moments and every fine histogram
    follow from the counts and the few keys set aside, with no pass of their
    own. This pass costs about what counting alone does.
    """
    bits = _bits(x)
    return _side_pass(bits.shape[0], lambda *t: _lib().tadmerge_coarse_side(_ptr(bits), *t))


def _side_pass(n: int, kernel) -> tuple[np.ndarray, np.ndarray] | None:
    """coarse_side's or coarse_side_raw's pass over n entries: its two streams'
    tables have spare slots for zero keys past the buckets (native.ZERO_SLOTS),
    added into bucket 0 here."""
    if n > PIECE:
        return None
    tables = np.zeros((2, N_COARSE + native.ZERO_SLOTS), np.int64)
    side = np.empty(max(1, n // SIDE_SHARE), np.int32)
    ns = kernel(n, _ptr(tables[0]), _ptr(tables[1]), _ptr(side), side.size)
    if ns < 0:
        return None
    total = tables[0] + tables[1]
    total[0] += total[N_COARSE:].sum()
    return total[:N_COARSE], side[:ns]


def fine_histogram_rows(x: torch.Tensor, wanted: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Fine histograms of the wanted coarse buckets: (non-empty low-16-bit bins,
    their counts) per bucket, int64.

    The count tables are int32 (a piece of at most 2**30 entries cannot overflow
    them), one row per wanted bucket and one for every other bucket (no branch in
    the loop), two tables (one per stream) while they are small.
    """
    fine_rows = _lib().tadmerge_fine_rows
    bits = _bits(x)
    m = len(wanted)
    lut = np.full(N_COARSE, m, np.int32)
    lut[np.asarray(wanted, dtype=np.int64)] = np.arange(m, dtype=np.int32)
    streams = 2 if m <= TWO_STREAM_ROWS else 1
    rows = np.empty((streams, m + 1, N_FINE), np.int32)
    total: np.ndarray | None = None  # int64 sums, only for inputs of several pieces
    for a in range(0, bits.shape[0], PIECE):
        rows[:] = 0
        piece = bits[a : a + PIECE]  # one table (rows[0] is rows[-1]): both streams
        fine_rows(_ptr(piece), piece.size, _ptr(lut), _ptr(rows[0]), _ptr(rows[-1]))
        if streams == 2:
            rows[0] += rows[1]  # each < 2**30: no overflow
        if a or bits.shape[0] > PIECE:
            total = rows[0, :m].astype(np.int64) if total is None else total + rows[0, :m]
    out = []
    for i in range(m):
        row = rows[0, i] if total is None else total[i]
        nz = np.flatnonzero(row)
        out.append((nz.astype(np.int64), row[nz].astype(np.int64)))
    return out


def signed_coarse(x: torch.Tensor) -> np.ndarray:
    """engine/signed.py's coarse counts of x's order keys (int64 × 2**16), one pass."""
    bits = _bits(x)
    counts = np.zeros(1 << 16, np.int64)
    _lib().tadmerge_signed_coarse(_ptr(bits), bits.size, _ptr(counts))
    return counts


def signed_fine(x: torch.Tensor, buckets: list[int]) -> np.ndarray:
    """engine/signed.py's fine counts (int64 [len(buckets), 2**16]) of the given
    coarse buckets of x's order keys, one pass."""
    bits = _bits(x)
    slot = np.full(1 << 16, len(buckets), np.int32)
    slot[np.asarray(buckets, dtype=np.int64)] = np.arange(len(buckets), dtype=np.int32)
    rows = np.zeros((len(buckets) + 1, 1 << 16), np.int64)
    _lib().tadmerge_signed_fine(_ptr(bits), bits.size, _ptr(slot), _ptr(rows))
    return rows[:-1]


def square_sum(x: torch.Tensor) -> float:
    """engine/block.py square_sum of a contiguous float32 CPU tensor: Σ x² in float64."""
    a = _flat32(x)
    return float(_lib().tadmerge_square_sum(_ptr(a), a.size)) if a.size else 0.0


# ---------------------------------------------------------------------------------
# the apply phase on float32 blocks (engine/sparsify.py, combine.py, methods/)
# ---------------------------------------------------------------------------------


def cut_block(t: torch.Tensor, lo: tuple[int, int], hi: tuple[int, int], scale: float) -> int:
    """Apply a resolved selection to a whole block in place, in flat order.

    lo/hi are (cut key, the block's ties at that key below the cut), as in
    sparsify.BlockCuts.keep and apply_keep; kept entries become τ·fl32(scale), dropped ones +0.0.
    Returns the kept count."""
    lib = _lib()
    x = _flat32(t)
    bits = x.view(np.int32)
    ends = [
        lib.tadmerge_tie_end(_ptr(bits), bits.size, int(key), int(quota))
        if quota > 0 and key >= 0
        else 0
        for key, quota in (lo, hi)
    ]
    return lib.tadmerge_cut_pass(
        _ptr(x), x.size, int(lo[0]), int(ends[0]), int(hi[0]), int(ends[1]),
        float(np.float32(scale)), int(scale != 1.0),
    )  # fmt: skip


def ties_votes(ts: list[torch.Tensor], weights: list[float]) -> int:
    """Σ sign(Σ_k fl32(w_k)·t_k) over a block, as methods/ties.py's ties_vote counts it."""
    arrays = [_flat32(t) for t in ts]
    n, k = arrays[0].size, len(arrays)
    w, up_down = np.float32(weights), np.zeros(2, np.int64)
    _lib().tadmerge_ties_votes(_arrays(arrays, n), k, n, _ptr(w, k), _ptr(up_down))
    return int(up_down[0] - up_down[1])


def ties_merge(
    ts: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor,
    scale: float,
    mean: bool,
    majority: int,
    count_cancel: bool,
) -> tuple[int, int]:
    """TIES of a whole block over ts[0] (see the kernel): the bytes of methods/ties.py's ties
    for finite values, with positive weights when `mean`. Returns (Σ sign of the
    votes, entries whose votes cancel exactly while a task moved, if counted)."""
    arrays = [_flat32(t) for t in ts]
    n, k = arrays[0].size, len(arrays)
    w, out3 = np.float32(weights), np.zeros(3, np.int64)  # up, down, cancelled
    _lib().tadmerge_ties_merge(
        _arrays(arrays, n), k, n, _ptr(w, k), _ptr(_flat32(base), n), float(np.float32(scale)),
        int(mean), int(majority), int(count_cancel), _ptr(out3),
    )  # fmt: skip
    return int(out3[0] - out3[1]), int(out3[2])


def emr_merge(ts: list[torch.Tensor], masks: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """EMR of a whole block (see the kernel): τ_uni over ts[0], M_k into the rows
    of the bool tensor `masks` (K × n). Returns the per-exponent mantissa sums
    (K × 256, int64) of |t_k| and of |M_k ⊙ τ_uni|; blocks of at most PIECE
    entries keep them below 2**54."""
    arrays = [_flat32(t) for t in ts]
    n, k = arrays[0].size, len(arrays)
    if n > PIECE:
        raise ValueError("emr_merge takes blocks of at most PIECE entries")
    m = masks.numpy()
    if m.dtype not in (np.bool_, np.uint8) or m.shape != (k, n):
        raise TypeError(f"emr_merge takes a {k} × {n} bool array of masks")
    abs_t = np.zeros((k, 256), np.int64)
    abs_u = np.zeros((k, 256), np.int64)
    if _lib().tadmerge_emr_merge(_arrays(arrays, n), k, n, _ptr(m), _ptr(abs_t), _ptr(abs_u)):
        raise MemoryError("emr_merge: its tables of exact sums could not be allocated")
    return abs_t, abs_u


def uniform_draws(out: torch.Tensor, lo: int, c1: int, c2: int) -> None:
    """sparsify._hash_into in one pass: the draws of a canonical block's entries
    lo .. lo + len(out) - 1 (below 2**32) for the lane keys c1, c2, into the
    contiguous float32 CPU tensor `out`; the same bits."""
    a = _flat32(out)
    if not 0 <= lo <= (1 << 32) - a.size:
        raise ValueError("uniform_draws: the entries must lie below 2**32")
    _lib().tadmerge_uniform_draws(_ptr(a), a.size, int(lo), int(c1), int(c2))


def della_rows(
    tau: torch.Tensor, u: torch.Tensor, m: int, lo: float, c: float, density: float, inverse: bool
) -> int:
    """methods/della.py's block in one pass per row, τ (contiguous float32 on the
    CPU, rows of m entries) rewritten with t in place; u: its draws. The same
    bits as the torch reference. Returns the kept count."""
    t = _flat32(tau)
    n = t.size
    if m <= 0 or n % m:
        raise TypeError("della_rows takes whole rows of m entries")
    kept = _lib().tadmerge_della_rows(
        _ptr(t), _ptr(_flat32(u), n), n // m, m, float(lo), float(c), float(density), int(inverse)
    )
    if kept < 0:
        raise MemoryError("della_rows: its buffers could not be allocated")
    return kept


def ram_merge(
    ts: list[torch.Tensor], base: torch.Tensor, epsilon: float, lambdas: list[float] | None
) -> torch.Tensor:
    """methods/ram.py's ram_delta plus θ0 in one pass over contiguous float32 CPU
    chunks, written over ts[0]; the same bits as the torch reference."""
    arrays = [_flat32(t) for t in ts]
    n, k = arrays[0].size, len(arrays)
    given = lambdas if lambdas is not None else [1.0] * k
    lams = np.float32(given)
    use = np.int8([x != 1.0 for x in given])  # (as ram_delta: a λ of 1 is not applied)
    _lib().tadmerge_ram_merge(
        _arrays(arrays, n), k, n, _ptr(_flat32(base), n), float(np.float32(epsilon)),
        _ptr(lams, k), _ptr(use, k),
    )  # fmt: skip
    return ts[0]


def ram_counts(ts: list[torch.Tensor], epsilon: float) -> np.ndarray:
    """methods/ram.py's moved_counts of contiguous float32 CPU blocks, in one pass."""
    arrays = [_flat32(t) for t in ts]
    n, k = arrays[0].size, len(arrays)
    counts = np.zeros(2 * k, np.int64)
    _lib().tadmerge_ram_counts(_arrays(arrays, n), k, n, float(np.float32(epsilon)), _ptr(counts))
    return counts


# ---------------------------------------------------------------------------------
# raw inputs: bf16 blocks (engine/raw.py) and streamed merges (engine/stream.py)
# ---------------------------------------------------------------------------------


def coarse_sparse_raw(
    base: torch.Tensor | np.ndarray, task: torch.Tensor | np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """coarse_sparse of τ = fl32(task) − fl32(base) for bf16 blocks, τ never stored."""
    b, t = _raw16(base), _raw16(task)
    return _side_pass(
        b.size, lambda *x: _lib().tadmerge_coarse_side_raw(_ptr(b), _ptr(t, b.size), *x)
    )


def tie_end_raw(
    base: torch.Tensor | np.ndarray, task: torch.Tensor | np.ndarray, key: int, quota: int
) -> int:
    """tie_end over τ = fl32(task) − fl32(base) of bf16 blocks (0 if none wanted)."""
    if quota <= 0 or key < 0:
        return 0
    b, t = _raw16(base), _raw16(task)
    return _lib().tadmerge_tie_end_raw(_ptr(b), _ptr(t, b.size), b.size, int(key), int(quota))


def _out(out: torch.Tensor | np.ndarray) -> np.ndarray:
    """The flat numpy view of an output block (a bf16 tensor: its patterns)."""
    if not isinstance(out, np.ndarray):  # a torch tensor: its memory as numpy
        import torch

        return _raw16(out) if out.dtype == torch.bfloat16 else _flat32(out)
    if not out.flags.c_contiguous:
        raise TypeError("the combining kernels write contiguous arrays")
    return out.reshape(-1)


def cut_combine_raw(
    base: torch.Tensor | np.ndarray,
    tasks: list,
    cuts: list[tuple[int, int, int, int, float]],
    weights: list[float],
    scale: float,
    average: bool,
    out: torch.Tensor | np.ndarray,
) -> list[int] | None:
    """Task arithmetic (or averaging) of the cut, rescaled task vectors of bf16
    blocks, into `out` (bf16 or float32): the bytes of cut_block then
    combine.task_arithmetic / average_of_deltas and the cast, in one pass.

    cuts: per task (lo key, lo tie end, hi key, hi tie end, scale), as cut_block
    applies them. Returns the kept count per task, or None when a result is NaN
    (the caller merges the block with torch instead; `out` is then garbage)."""
    b, o = _raw16(base), _out(out)
    n, k = b.size, len(tasks)
    if o.dtype not in (np.uint16, np.float32):
        raise TypeError(f"cut_combine_raw writes bf16 patterns or float32, not {o.dtype}")
    lo_key = np.array([1 << 31 if c[0] < 0 else c[0] for c in cuts], np.int64)
    hi_key = np.array([1 << 31 if c[2] < 0 else c[2] for c in cuts], np.int64)
    lo_end = np.array([c[1] for c in cuts], np.int64)
    hi_end = np.array([c[3] for c in cuts], np.int64)
    scales = np.array([c[4] for c in cuts], np.float32)
    w, kept = np.float32(weights), np.zeros(k, np.int64)
    nan = _lib().tadmerge_cut_combine_raw(
        _ptr(b), _arrays([_raw16(t) for t in tasks], n), k, n, _ptr(lo_key, k), _ptr(lo_end, k),
        _ptr(hi_key, k), _ptr(hi_end, k), _ptr(scales, k), _ptr(w, k), float(np.float32(scale)),
        float(np.float32(sum(weights))), int(average), _ptr(o, n), _dtype_code(o), _ptr(kept),
    )  # fmt: skip
    return None if nan else [int(v) for v in kept]


def stream_raw(
    base: np.ndarray,
    tasks: list[np.ndarray],
    weights: list[float],
    scale: float,
    average: bool,
    out: np.ndarray,
    divisor: float | None = None,
) -> tuple[list[float], int]:
    """Task arithmetic (or averaging) without a sparsifier into `out`, one pass
    per task: the bytes of merge_block (linear.merge_weights) and the cast to
    the output's dtype. base, tasks and out: flat arrays of STREAM_DTYPES (bf16
    as uint16 patterns), each its own. Averaging divides by Σ weights, or by
    `divisor` (fl32) where given. Returns Σ τ_k² per task (float64 sums, in
    another order than merge_block's: the report's last digits differ) and
    how many results are NaN (then `out` must not be used: merge_block merges
    such a block, with torch's NaN bits)."""
    b, ts, o = base.reshape(-1), [t.reshape(-1) for t in tasks], _out(out)
    n, k = b.size, len(ts)
    dts = np.array([_dtype_code(x) for x in (b, *ts)], np.int32)
    sq, lanes = np.zeros(k, np.float64), np.zeros(k * native.CHUNK, np.float64)
    with np.errstate(over="ignore"):  # (a coefficient beyond float32 is Inf, as in torch)
        w = np.float32(weights)
        total = np.float32(sum(weights) if divisor is None else divisor)
    nan = _lib().tadmerge_stream(
        _ptr(b), _arrays(ts, n), _ptr(dts), k, n, _ptr(w, k), float(np.float32(scale)),
        float(total), int(average), _ptr(o, n), _dtype_code(o), _ptr(sq), _ptr(lanes),
    )  # fmt: skip
    return [float(v) for v in sq], nan


# ---------------------------------------------------------------------------------
# exact sums of products (engine/sums.py)
# ---------------------------------------------------------------------------------


def _sums_args(vs: list, base, sub: list[bool]):
    """The sums kernels' arguments: the vectors (float32 tensors, or raw numpy
    blocks of STREAM_DTYPES, bf16 as uint16), flat, of n entries; their dtype
    codes, the base's last (float32's where there is none); the base's address
    and the int8 flags of the vectors taken as task vectors, as the kernel
    takes them. The arrays are returned too: a flattened copy must outlive the
    call that reads it."""

    def flat(x):
        return x.reshape(-1) if isinstance(x, np.ndarray) else _flat32(x)

    flags = np.array(sub, np.int8)
    if flags.any() and base is None:
        raise ValueError("the exact sums kernels make task vectors from a base")
    arrays = [flat(v) for v in vs]
    b = None if base is None else flat(base)
    n, k = arrays[0].size, len(arrays)
    dts = np.array(
        [_dtype_code(x) for x in (*arrays, np.empty(0, np.float32) if b is None else b)], np.int32
    )
    ptrs = (_arrays(arrays, n), _ptr(dts), None if b is None else _ptr(b, n), _ptr(flags, k))
    return (arrays, b, flags, dts), n, k, ptrs


def sums_range(
    vs: list[torch.Tensor],
    base: torch.Tensor | None,
    sub: list[bool],
    lo: np.ndarray,
    hi: np.ndarray,
) -> None:
    """The least and greatest exponent field of each vector into lo, hi (int32,
    updated: min, max), as sums.exact_sums's first pass takes them; v_j is
    fl32(vs[j] − base) where sub[j] (vectors of at most PIECE entries: float32
    tensors, or raw blocks of STREAM_DTYPES, widened as torch widens them)."""
    held, n, k, (vp, dp, bp, fp) = _sums_args(vs, base, sub)
    if lo.dtype != np.int32 or hi.dtype != np.int32:
        raise TypeError("sums_range updates int32 exponent fields")
    _lib().tadmerge_sums_range(vp, dp, bp, fp, k, n, _ptr(lo, k), _ptr(hi, k))
    del held  # (the arrays behind the addresses, kept to here)


def sums_accumulate(
    vs: list[torch.Tensor],
    base: torch.Tensor | None,
    sub: list[bool],
    pairs: list[tuple[int, int]],
    a: int,
    layout: tuple[int, int, bool],
    b0: int,
    hi: np.ndarray,
    lo: np.ndarray,
) -> int:
    """sums.exact_sums's binned integers of one piece (at most PIECE entries,
    starting at entry `a` of its block) added into hi, lo (int64 [pairs,
    segments, bins from b0]); layout: (segment size, segments, column). Returns
    the count the reference adds to ExactSums.nonfinite."""
    held, n, k, (vp, dp, bp, fp) = _sums_args(vs, base, sub)
    seg_size, n_seg, column = layout
    s = len(pairs)
    shapes = hi.ndim == 3 and {hi.shape, lo.shape} == {(s, n_seg, hi.shape[-1])}
    if not shapes or {hi.dtype, lo.dtype} != {np.dtype(np.int64)}:
        raise TypeError("sums_accumulate takes int64 tables [pairs, segments, bins]")
    if not n:
        return 0
    pi = np.array([p[0] for p in pairs], np.int32)
    pj = np.array([p[1] for p in pairs], np.int32)
    got = _lib().tadmerge_sums_accumulate(
        vp, dp, bp, fp, k, n, _ptr(pi), _ptr(pj), s, int(a), int(seg_size), int(n_seg),
        int(column), int(b0), hi.shape[2], _ptr(hi), _ptr(lo, hi.size),
    )  # fmt: skip
    del held  # (the arrays behind the addresses, kept to here)
    if got < 0:
        raise MemoryError("sums_accumulate: its tile buffers could not be allocated")
    return got
