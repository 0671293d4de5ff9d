"""Fused CPU kernels for the statistics and apply passes, when numba is installed.

The exact statistics of a magnitude selection (exact.coarse_stats,
histogram.fine_histograms) are integer histograms of the magnitude keys. In
torch each is a chain of whole-tensor ops (mask, shift, convert, three
bincounts), 5-6 ns per element and task on one core, which made TADrop's
statistics cost more than reading the inputs. Here each is one loop over the
float32 bits: the key, its bucket and the counts in registers, about 0.7 ns per
element. The results are the same integers (tests/test_engine_chunks.py runs
both backends against plain references), so output bytes do not depend on
which backend ran. The apply phase has more: a resolved selection applied to
a whole block (cut_block), TIES on a whole block (ties_votes, ties_merge) and
EMR on a whole block (emr_merge), each one pass instead of ten or more chunked
torch ops, with the same float32 operations in the same order. For bf16
inputs, the raw kernels (coarse_sparse_raw, tie_end_raw, cut_combine_raw) make
τ = fl32(θ_k) − fl32(θ_0) in registers from the 16-bit patterns instead of
reading a stored float32 τ (engine/raw.py).

Backend: numba when it can be imported and the data is on the CPU, else torch.
`runtime.kernels: torch` (or TADMERGE_KERNELS=torch, read by the driver's
dispatch, cluster/dispatch.py) forces the torch path. The kernels of raw bf16
blocks (coarse_side_raw, tie_end_raw, cut_combine_raw, stream_raw) also exist
in C (native.py): with the backend auto those are taken wherever the machine's
compiler builds them, since they load in a millisecond where numba's import and
registries take ~0.5 s of CPU (a third of a warm 271M task arithmetic merge),
and run faster; the same integers and bytes (tests/test_engine_raw.py,
test_engine_native.py).
Kernels are compiled on first use and cached on disk (numba's `cache=True`),
and they release the GIL, so the local executor's worker threads run them in
parallel.
"""

from __future__ import annotations

import threading
import warnings
from functools import cache
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from . import native
from .keys import N_COARSE, N_FINE

if TYPE_CHECKING:
    import torch

# Elements per kernel call: Σ L² per bucket stays below 2**62 in int64.
PIECE = 1 << 30
# entries per chunk of cut_combine_raw: its four buffers stay in L1
RAW_CHUNK = 2048
# shift counts as unsigned numbers: an unsigned value shifted by a signed one is
# a signed int64 to numba, whose indexing then checks for negative indices
U16 = np.uint32(16)
M31 = np.uint32(0x7FFFFFFF)
LOW16 = np.uint32(0xFFFF)
# up to this many wanted buckets the fine kernel keeps one table per stream
TWO_STREAM_ROWS = 8

# This process's backend, as the driver's dispatch set it (cluster/dispatch.py):
# a process runs one merge's units at a time, and every unit of a merge takes
# the same backend.
_backend = "auto"


def set_backend(name: str) -> None:
    """'auto' (numba if importable), 'numba' (required) or 'torch'."""
    global _backend
    if name not in ("auto", "numba", "torch"):
        raise ValueError(f"kernels backend must be auto, numba or torch, not {name!r}")
    _backend = name


def backend() -> str:
    return _backend


_LOCK = threading.Lock()
_preloading = False  # a preload thread was started (it loads once)


class _Kernels(NamedTuple):
    """The compiled kernels (numba dispatchers), by name."""

    coarse_counts: Any
    coarse_moments: Any
    coarse_side: Any
    fine_rows: Any
    tie_end: Any
    cut_pass: Any
    ties_votes: Any
    ties_merge: Any
    emr_merge: Any
    coarse_side_raw: Any
    tie_end_raw: Any
    cut_combine_raw: Any
    stream_raw: Any


def _numba_kernels() -> _Kernels | None:
    """The compiled kernels, once per process (worker threads share them); None
    without numba."""
    with _LOCK:
        return _compile()


def preload(raw_only: bool = False) -> None:
    """Start loading the kernels in a background thread.

    Importing numba takes ~0.35 s and loading each kernel's cached machine code
    ~0.05 s, mostly in Python; begun when a merge starts, it overlaps planning
    and the first reads instead of stalling the first histogram. Called only
    for merges whose histograms will take the kernels; `raw_only`: the merge
    takes the raw bf16 kernels (engine/raw.py), and only those are loaded now
    (any other loads on its first call, as numba does).
    """
    global _preloading
    if _backend == "torch" or _compile.cache_info().currsize or _preloading:
        return
    _preloading = True

    def load() -> None:
        if raw_only and native_raw():
            return  # the raw kernels in C (native.py): numba is not needed up front
        k = _numba_kernels()  # (the raw kernels load with the dispatchers)
        if k is not None and not raw_only:
            _rest_ready(k)

    threading.Thread(target=load, name="tadmerge-kernels", daemon=True).start()


@cache
def _compile():
    try:
        import numba
    except ImportError:
        return None
    try:
        return _build(numba, cache_on_disk=True)
    except Exception as e:  # no writable cache location, or a numba/LLVM problem
        first = e
    try:
        built = _build(numba, cache_on_disk=False)
    except Exception as e:
        warnings.warn(f"tadmerge: numba kernels unavailable, using torch ops ({e})", stacklevel=3)
        return None
    warnings.warn(f"tadmerge: numba kernels without the disk cache ({first})", stacklevel=3)
    return built


def _build(numba, cache_on_disk: bool):
    jit = numba.njit(cache=cache_on_disk, nogil=True)

    # Each kernel runs two independent streams (the two halves of the input) into
    # two tables: a value that repeats (the zeros of an untouched row) otherwise
    # makes every increment wait for the previous one to the same counter.
    #
    # Indexing: numba wraps a negative index unless it knows the index is not
    # negative: a range variable from 0, or an unsigned integer. That check on
    # every access keeps a loop from vectorising (a loop over x[a + j] ran 7x
    # slower than over a slice x[a:b] indexed by j), so loops index slices from 0
    # and tables take unsigned bucket numbers (U16, M31, LOW16).

    @jit
    def coarse_counts(bits, counts, counts2):  # pragma: no cover (compiled)
        h = bits.shape[0] // 2
        lo, hi = bits[:h], bits[h : 2 * h]
        for i in range(h):
            counts[(np.uint32(lo[i]) & M31) >> U16] += 1
            counts2[(np.uint32(hi[i]) & M31) >> U16] += 1
        if bits.shape[0] % 2:
            counts[(np.uint32(bits[-1]) & M31) >> U16] += 1

    @jit
    def coarse_moments(bits, acc, acc2):  # pragma: no cover (compiled)
        # acc[b] = (count, Σ L, Σ L²) of bucket b
        h = bits.shape[0] // 2
        lo, hi = bits[:h], bits[h : 2 * h]
        for i in range(h):
            k = np.uint32(lo[i]) & M31
            k2 = np.uint32(hi[i]) & M31
            b, low = k >> U16, np.int64(k & 0xFFFF)
            b2, low2 = k2 >> U16, np.int64(k2 & 0xFFFF)
            acc[b, 0] += 1
            acc[b, 1] += low
            acc[b, 2] += low * low
            acc2[b2, 0] += 1
            acc2[b2, 1] += low2
            acc2[b2, 2] += low2 * low2
        if bits.shape[0] % 2:
            k = np.uint32(bits[-1]) & M31
            b, low = k >> U16, np.int64(k & 0xFFFF)
            acc[b, 0] += 1
            acc[b, 1] += low
            acc[b, 2] += low * low

    @jit
    def coarse_side(bits, counts, counts2, side):  # pragma: no cover (compiled)
        # counts per bucket, and the keys whose low 16 bits are not all zero set
        # aside (they alone carry the moments and the fine bins other than 0);
        # -1 as soon as `side` is full. The branch is rarely taken on the data
        # this is for (bf16 task vectors: ~1% of entries), so it predicts well.
        n = bits.shape[0]
        h = n // 2
        cap = side.shape[0]
        ns = 0
        lo, hi = bits[:h], bits[h : 2 * h]
        for i in range(h):
            k = np.uint32(lo[i]) & M31
            k2 = np.uint32(hi[i]) & M31
            counts[k >> U16] += 1
            counts2[k2 >> U16] += 1
            if (k & 0xFFFF) != 0:
                if ns == cap:
                    return -1
                side[ns] = k
                ns += 1
            if (k2 & 0xFFFF) != 0:
                if ns == cap:
                    return -1
                side[ns] = k2
                ns += 1
        if n % 2:
            k = np.uint32(bits[-1]) & M31
            counts[k >> U16] += 1
            if (k & 0xFFFF) != 0:
                if ns == cap:
                    return -1
                side[ns] = k
                ns += 1
        return ns

    @jit
    def fine_rows(bits, lut, rows, rows2):  # pragma: no cover (compiled)
        # lut: coarse bucket -> row; unwanted buckets map to the last row (no branch)
        h = bits.shape[0] // 2
        lo, hi = bits[:h], bits[h : 2 * h]
        for i in range(h):
            k = np.uint32(lo[i]) & M31
            k2 = np.uint32(hi[i]) & M31
            rows[np.uint32(lut[k >> U16]), k & LOW16] += 1
            rows2[np.uint32(lut[k2 >> U16]), k2 & LOW16] += 1
        if bits.shape[0] % 2:
            k = np.uint32(bits[-1]) & M31
            rows[np.uint32(lut[k >> U16]), k & LOW16] += 1

    # The apply phase: a resolved selection applied to a whole block in one pass
    # (sparsify.apply_cuts makes about ten torch passes over each chunk). Σ t²
    # for the report is left to torch's vectorised norm: a float64 sum in this
    # loop would make every element wait on the previous one's addition. The
    # loop body is written out: numba's calls of a helper, even inlined, cost
    # ~30 ns per element here. Kernels call no other kernel: numba's disk cache
    # misses, every process, for a function that holds another dispatcher in
    # its closure.

    @jit
    def tie_end(tb, key, quota):  # pragma: no cover (compiled)
        """One past the quota-th entry with magnitude key `key` (0 if none wanted).

        Counted 1024 entries at a time (a loop without an exit vectorises), then
        entry by entry within the step that holds the quota-th tie."""
        n = tb.shape[0]
        c = 0
        a = 0
        while a < n:
            b = min(n, a + 1024)
            s = tb[a:b]
            here = 0
            for j in range(b - a):
                here += np.int64((s[j] & 0x7FFFFFFF) == key)
            if c + here >= quota:
                for j in range(b - a):
                    c += np.int64((s[j] & 0x7FFFFFFF) == key)
                    if c == quota:
                        return a + j + 1
            c += here
            a = b
        return n

    @jit
    def cut_pass(t, lo_key, lo_end, hi_key, hi_end, scale, rescale):  # pragma: no cover
        # Branch-free where the data decides (keep or drop is a coin flip at
        # TADrop's rates, and a branch there mispredicts half the time): masks
        # from the sign of differences, -1 below a cut, 0 elsewhere. Ties at a
        # cut key are below it before the position where the block's quota of
        # them ends (tie_end, found first), so no count runs through the loop.
        tb = t.view(np.int32)
        lk = np.int64(1 << 31) if lo_key < 0 else np.int64(lo_key)  # -1: all below
        hk = np.int64(1 << 31) if hi_key < 0 else np.int64(hi_key)
        kept = np.int64(0)
        for i in range(t.shape[0]):
            k = np.int64(tb[i] & 0x7FFFFFFF)
            below_lo = ((k - lk) >> 63) | ((((k ^ lk) - 1) >> 63) & ((i - lo_end) >> 63))
            below_hi = ((k - hk) >> 63) | ((((k ^ hk) - 1) >> 63) & ((i - hi_end) >> 63))
            keep = below_hi & ~below_lo
            if rescale:
                t[i] = t[i] * scale
            tb[i] = tb[i] & np.int32(keep)
            kept -= keep
        return kept

    # TIES on a whole block, one pass (combine.ties makes ~15 torch passes over
    # each chunk). ts: a tuple of the K sparsified task vectors (one compiled
    # version per K, cached on disk); w: their float32 weights. The same float32
    # operations in the same order as combine.ties for finite values: products
    # p_k = t_k·w_k, total = ((p_1 + p_2) + p_3) + ..., the elected sign s (zero
    # totals take `majority`), num = Σ of the agreeing q_k = p_k·s in task order
    # from +0.0, den = Σ of their weights, merged = (num·s / den, +0.0 if no task
    # agrees)·scale + base, written over ts[0].

    @jit
    def ties_votes(ts, w):  # pragma: no cover (compiled)
        up = np.int64(0)
        down = np.int64(0)
        for i in range(ts[0].shape[0]):
            total = ts[0][i] * w[0]
            for k in range(1, len(ts)):
                total += ts[k][i] * w[k]
            up += np.int64(total > 0)
            down += np.int64(total < 0)
        return up, down

    @jit
    def ties_merge(ts, w, base, scale, mean, majority, count_cancel):  # pragma: no cover
        out = ts[0]
        up = np.int64(0)
        down = np.int64(0)
        cancel = np.int64(0)
        zero = np.float32(0.0)
        for i in range(out.shape[0]):
            total = ts[0][i] * w[0]
            for k in range(1, len(ts)):
                total += ts[k][i] * w[k]
            up += np.int64(total > 0)
            down += np.int64(total < 0)
            if count_cancel and total == 0:
                moved = False
                for k in range(len(ts)):
                    moved |= ts[k][i] * w[k] != 0
                cancel += np.int64(moved)
            if majority > 0:
                s = np.float32(-1.0) if total < 0 else np.float32(1.0)
            else:
                s = np.float32(1.0) if total > 0 else np.float32(-1.0)
            num = zero
            den = zero
            for k in range(len(ts)):
                q = (ts[k][i] * w[k]) * s
                agree = q > 0
                num += q if agree else zero
                den += w[k] if agree else zero
            v = num * s
            if mean:
                v = v / (den if den != 0 else np.float32(1.0))
            out[i] = (v + zero) * scale + base[i]
        return up, down, cancel

    # EMR on a whole block, one pass (combine.emr makes ~20 torch passes per task
    # over each chunk): σ = +1 where Σ t_k > 0 else -1, M_k = [t_k·σ > 0],
    # τ_uni = σ·max_k(M_k·|t_k|) + 0.0 written over ts[0], the masks into rows of
    # `masks`, and the exact sums of the rescalers as integers per exponent: Σ of
    # the 24-bit mantissas of |t_k| (abs_t[k, e]) and of |τ_uni| where M_k
    # (abs_u[k, e]), which exact.exact_sum_by_exponent scales and adds.

    @jit
    def emr_merge(ts, tbits, masks, abs_t, abs_u):  # pragma: no cover (compiled)
        out = ts[0]
        obits = tbits[0]
        zero = np.float32(0.0)
        for i in range(out.shape[0]):
            total = ts[0][i]
            for k in range(1, len(ts)):
                total += ts[k][i]
            s = np.float32(1.0) if total > 0 else np.float32(-1.0)
            mag = zero
            for k in range(len(ts)):
                key = tbits[k][i] & 0x7FFFFFFF
                e = key >> 23
                abs_t[k, e] += (key & 0x7FFFFF) | (np.int64(e > 0) << 23)
                q = ts[k][i] * s
                agree = q > 0
                masks[k, i] = agree
                mag = max(mag, q if agree else zero)
            out[i] = mag  # stored to read its bits (numba has no scalar bitcast)
            key = obits[i] & 0x7FFFFFFF
            e = key >> 23
            m = (key & 0x7FFFFF) | (np.int64(e > 0) << 23)
            for k in range(len(ts)):
                abs_u[k, e] += m if masks[k, i] else 0
            out[i] = mag * s + zero

    # Magnitude selections on raw bf16 inputs (engine/raw.py): each task vector
    # entry τ = fl32(θ_k) − fl32(θ_0) is made in registers from the two 16-bit
    # patterns (a bf16 is the top half of its float32) and never stored, where
    # merge_block widens every input to a float32 block, writes τ over it and
    # reads it back in each later pass. The same float32 subtraction, so the same
    # bits.

    @jit
    def coarse_side_raw(base, task, counts, counts2, side):  # pragma: no cover
        # coarse_side of τ's keys (two streams), τ made from the raw bf16 bits
        n = base.shape[0]
        h = n // 2
        cap = side.shape[0]
        ns = 0
        b1, b2, t1, t2 = base[:h], base[h : 2 * h], task[:h], task[h : 2 * h]
        for i in range(h):
            x = np.int32(np.int32(t1[i]) << 16).view(np.float32)
            y = np.int32(np.int32(b1[i]) << 16).view(np.float32)
            x2 = np.int32(np.int32(t2[i]) << 16).view(np.float32)
            y2 = np.int32(np.int32(b2[i]) << 16).view(np.float32)
            k = np.uint32(np.float32(x - y).view(np.int32)) & M31
            k2 = np.uint32(np.float32(x2 - y2).view(np.int32)) & M31
            counts[k >> U16] += 1
            counts2[k2 >> U16] += 1
            if (k & 0xFFFF) != 0:
                if ns == cap:
                    return -1
                side[ns] = k
                ns += 1
            if (k2 & 0xFFFF) != 0:
                if ns == cap:
                    return -1
                side[ns] = k2
                ns += 1
        if n % 2:
            x = np.int32(np.int32(task[n - 1]) << 16).view(np.float32)
            y = np.int32(np.int32(base[n - 1]) << 16).view(np.float32)
            k = np.uint32(np.float32(x - y).view(np.int32)) & M31
            counts[k >> U16] += 1
            if (k & 0xFFFF) != 0:
                if ns == cap:
                    return -1
                side[ns] = k
                ns += 1
        return ns

    @jit
    def tie_end_raw(base, task, key, quota):  # pragma: no cover (compiled)
        # tie_end over τ's keys, τ made from the raw bf16 bits
        n = base.shape[0]
        k32 = np.int32(key)
        c = 0
        a = 0
        while a < n:
            b = min(n, a + 1024)
            bs, ts = base[a:b], task[a:b]
            here = 0
            for j in range(b - a):
                x = np.int32(np.int32(ts[j]) << 16).view(np.float32)
                y = np.int32(np.int32(bs[j]) << 16).view(np.float32)
                here += np.int32((np.float32(x - y).view(np.int32) & 0x7FFFFFFF) == k32)
            if c + here >= quota:
                for j in range(b - a):
                    x = np.int32(np.int32(ts[j]) << 16).view(np.float32)
                    y = np.int32(np.int32(bs[j]) << 16).view(np.float32)
                    c += np.int64((np.float32(x - y).view(np.int32) & 0x7FFFFFFF) == k32)
                    if c == quota:
                        return a + j + 1
            c += here
            a = b
        return n

    @jit
    def cut_combine_raw(
        base,
        tasks,
        lo_key,
        lo_end,
        hi_key,
        hi_end,
        scale,
        w,
        lam,
        total_w,
        average,
        out16,
        out32,
        kept,
    ):  # pragma: no cover (compiled)
        # Per entry: τ_k from the raw bits, t_k = τ_k·fl32(s_k), kept or +0.0 as
        # cut_pass decides, then the combiner of combine.task_arithmetic
        # (Σ_k t_k·w_k in task order, ·λ, + θ0) or of combine.average_of_deltas
        # (Σ_k t_k·w_k / Σw + θ0), rounded to bf16 as torch rounds (to nearest,
        # ties to even) into out16, or stored into out32. x·1 = x exactly, so
        # unit weights and scales need no branch. Chunk by chunk through small
        # buffers whose float32 and int32 views give the bits of a value (loops
        # that vectorise). Cut keys are int32 here: "all below" (2**31) becomes
        # 0x7FFFFFFF, above every finite key. Returns how many results are NaN
        # (torch's bf16 NaN pattern is its own business: the caller redoes the
        # block with torch).
        n = base.shape[0]
        narrow = out16.shape[0] > 0
        c = RAW_CHUNK
        bb = np.empty(c, np.int32)
        bf = bb.view(np.float32)
        tb = np.empty(c, np.int32)
        tf = tb.view(np.float32)
        sb = np.empty(c, np.int32)
        sf = sb.view(np.float32)
        acc = np.empty(c, np.float32)
        accb = acc.view(np.int32)
        nan = 0
        for a in range(0, n, c):
            m = min(c, n - a)
            bs = base[a : a + m]
            for j in range(m):
                bb[j] = np.int32(bs[j]) << 16
            for k in range(len(tasks)):
                ts = tasks[k][a : a + m]
                lk = np.int32(min(lo_key[k], 0x7FFFFFFF))
                hk = np.int32(min(hi_key[k], 0x7FFFFFFF))
                le = np.int32(max(-1, min(lo_end[k] - a, c + 1)))
                he = np.int32(max(-1, min(hi_end[k] - a, c + 1)))
                s = scale[k]
                wk = w[k]
                cnt = np.int32(0)
                for j in range(m):
                    tb[j] = np.int32(ts[j]) << 16
                    tf[j] = tf[j] - bf[j]
                    kb = tb[j] & np.int32(0x7FFFFFFF)
                    jj = np.int32(j)
                    below_lo = (kb < lk) | ((kb == lk) & (jj < le))
                    below_hi = (kb < hk) | ((kb == hk) & (jj < he))
                    keep = below_hi & ~below_lo
                    cnt += np.int32(keep)
                    sf[j] = tf[j] * s
                    sb[j] = sb[j] & -np.int32(keep)
                kept[k] += cnt
                if k == 0:
                    for j in range(m):
                        acc[j] = sf[j] * wk
                else:
                    for j in range(m):
                        acc[j] = acc[j] + sf[j] * wk
            if average:
                for j in range(m):
                    acc[j] = acc[j] / total_w + bf[j]
            else:
                for j in range(m):
                    acc[j] = acc[j] * lam + bf[j]
            if narrow:
                o16 = out16[a : a + m]
                for j in range(m):
                    u = np.uint32(accb[j])
                    nan += np.int32((u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000))
                    r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> 16
                    o16[j] = np.uint16(r)
            else:
                o32 = out32[a : a + m]
                for j in range(m):
                    nan += np.int32((accb[j] & np.int32(0x7FFFFFFF)) > np.int32(0x7F800000))
                    o32[j] = acc[j]
        return nan

    @jit
    def stream_raw(base, tasks, w, lam, total_w, average, out16, out32, sq):  # pragma: no cover
        # Task arithmetic (Σ_k fl32(w_k)·τ_k in task order, ·λ, + θ0) or averaging
        # (Σ_k fl32(w_k)·θ_k / Σw) of bf16 blocks, the float32 operations of
        # engine/stream.py in its order, rounded to bf16 as torch rounds into
        # out16, or stored into out32. Σ τ_k² for the report goes to sq[k] (float64
        # per lane, the lanes added at the end: a loop that vectorises). Returns
        # how many results are NaN (the caller then merges the block in numpy).
        n = base.shape[0]
        narrow = out16.shape[0] > 0
        c = RAW_CHUNK
        k_count = len(tasks)
        bb = np.empty(c, np.int32)
        bf = bb.view(np.float32)
        tb = np.empty(c, np.int32)
        tf = tb.view(np.float32)
        acc = np.empty(c, np.float32)
        accb = acc.view(np.int32)
        lanes = np.zeros((k_count, c), np.float64)
        nan = 0
        for a in range(0, n, c):
            m = min(c, n - a)
            bs = base[a : a + m]
            for j in range(m):
                bb[j] = np.int32(bs[j]) << 16
            for k in range(k_count):
                ts = tasks[k][a : a + m]
                wk = w[k]
                lane = lanes[k]
                # one loop per (first task or not, averaging or not): no branch inside
                if average:  # sums θ_k; τ_k for the report only
                    if k == 0:
                        for j in range(m):
                            tb[j] = np.int32(ts[j]) << 16
                            d = np.float64(tf[j] - bf[j])
                            lane[j] += d * d
                            acc[j] = tf[j] * wk
                    else:
                        for j in range(m):
                            tb[j] = np.int32(ts[j]) << 16
                            d = np.float64(tf[j] - bf[j])
                            lane[j] += d * d
                            acc[j] = acc[j] + tf[j] * wk
                elif k == 0:
                    for j in range(m):
                        tb[j] = np.int32(ts[j]) << 16
                        tf[j] = tf[j] - bf[j]
                        d = np.float64(tf[j])
                        lane[j] += d * d
                        acc[j] = tf[j] * wk
                else:
                    for j in range(m):
                        tb[j] = np.int32(ts[j]) << 16
                        tf[j] = tf[j] - bf[j]
                        d = np.float64(tf[j])
                        lane[j] += d * d
                        acc[j] = acc[j] + tf[j] * wk
            if average:
                for j in range(m):
                    acc[j] = acc[j] / total_w
            else:
                for j in range(m):
                    acc[j] = acc[j] * lam + bf[j]
            if narrow:
                o16 = out16[a : a + m]
                for j in range(m):
                    u = np.uint32(accb[j])
                    nan += np.int32((u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000))
                    r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> 16
                    o16[j] = np.uint16(r)
            else:
                o32 = out32[a : a + m]
                for j in range(m):
                    nan += np.int32((accb[j] & np.int32(0x7FFFFFFF)) > np.int32(0x7F800000))
                    o32[j] = acc[j]
        for k in range(k_count):
            total = 0.0
            for j in range(c):
                total += lanes[k, j]
            sq[k] = total
        return nan

    k = _Kernels(
        coarse_counts, coarse_moments, coarse_side, fine_rows, tie_end, cut_pass, ties_votes,
        ties_merge, emr_merge, coarse_side_raw, tie_end_raw, cut_combine_raw, stream_raw,
    )  # fmt: skip
    _warm_raw(k)  # here, where a failure to compile or cache is caught
    return k


def _warm_raw(k: _Kernels) -> None:
    """Load (or compile) the raw bf16 path's kernels (engine/raw.py) for the
    signatures the engine calls, rather than on first use in several worker
    threads at once (numba's compiler lock makes those wait on each other).
    Its combine kernels (cut_combine_raw, stream_raw) compile per K on first use."""
    raw = np.zeros(4, np.uint16)
    zeros = np.zeros(N_COARSE, np.int64)
    k.coarse_side_raw(raw, raw, zeros, zeros.copy(), np.zeros(4, np.int32))
    k.tie_end_raw(raw, raw, np.int64(0), np.int64(1))


_REST_LOCK = threading.Lock()
# the kernels of float32 blocks: (the set they belong to, loaded or failed)
_rest_state: tuple[_Kernels, bool] | None = None


def _rest_ready(k: _Kernels) -> bool:
    """Load the kernels of float32 blocks once (_warm_rest); False, with a
    warning, when numba or LLVM cannot compile them: the torch ops then do
    their work, as when numba is missing. Only the raw kernels are loaded
    inside _compile's guard (a merge on the raw path needs no more), so this
    is the same guard for the others, taken before their first use."""
    global _rest_state
    state = _rest_state
    if state is None or state[0] is not k:
        with _REST_LOCK:
            state = _rest_state
            if state is None or state[0] is not k:
                try:
                    _warm_rest(k)
                    state = (k, True)
                except Exception as e:  # a numba/LLVM problem
                    warnings.warn(
                        f"tadmerge: numba kernels for float32 blocks unavailable, using "
                        f"torch ops ({e})",
                        stacklevel=3,
                    )
                    state = (k, False)
                _rest_state = state
    return state[1]


def _warm_rest(k: _Kernels) -> None:
    """The same for the statistics and apply kernels of float32 blocks (the
    TIES and EMR ones compile per K on first use)."""
    bits = np.zeros(4, np.int32)
    zeros = np.zeros(N_COARSE, np.int64)
    k.coarse_counts(bits, zeros, zeros.copy())
    acc = np.zeros((2, N_COARSE, 3), np.int64)
    k.coarse_moments(bits, acc[0], acc[1])
    k.coarse_side(bits, zeros, zeros.copy(), np.zeros(4, np.int32))
    rows = np.zeros((2, 1, N_FINE), np.int32)
    k.fine_rows(bits, np.zeros(N_COARSE, np.int32), rows[0], rows[1])
    k.tie_end(bits, np.int64(0), np.int64(1))
    vals = np.zeros(4, np.float32)
    k.cut_pass(vals, np.int64(0), np.int64(0), np.int64(0), np.int64(0), np.float32(1), True)


def load() -> bool:
    """Compile or load the kernels now (what a process pays for them: time and RSS)."""
    if _backend == "torch" or (k := _numba_kernels()) is None:
        return False
    return _rest_ready(k)


def enabled(x: torch.Tensor | np.ndarray | None, load_now: bool = True) -> bool:
    """Whether the numba kernels take `x` (a float32 or int32 tensor, a numpy
    array, or None: a CPU block that was never stored, keys.SparseKeys, which
    only the raw bf16 kernels read).

    With load_now=False they take it only if this process loaded them already
    (numba and LLVM cost ~145 MB of RSS and ~0.9 s to load): the statistics
    rounds of a counts-only selection pass that, since torch is within 2x of
    the kernels there, and the merges that take the apply kernels (magnitude
    selections, TIES, EMR) load them at the start (cluster/worker.start_kernels).
    With the backend set to numba (runtime.kernels or TADMERGE_KERNELS) they are
    always loaded, and their absence is an error.
    """
    if _backend == "torch" or not _on_cpu(x):
        return False
    if x is None and native_raw():
        return True  # the raw kernels in C (native.py), loaded in a millisecond
    if not load_now and _backend == "auto" and not _compile.cache_info().currsize:
        return False
    k = _numba_kernels()
    if k is None or (x is not None and not _rest_ready(k)):
        if _backend == "numba":
            raise RuntimeError(
                "kernels: numba was asked for (runtime.kernels or TADMERGE_KERNELS), but "
                "numba cannot be imported or compile them (see the warning, if any)"
            )
        return False
    return True


def _on_cpu(x) -> bool:
    """A torch tensor on the CPU, a numpy array, or None (no values held)."""
    device = getattr(x, "device", "cpu")  # numpy arrays say "cpu" too
    return getattr(device, "type", device) == "cpu"


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


def coarse_pieces(x: torch.Tensor, moments: int):
    """Per coarse bucket of |x|'s key: count, Σ L (moments >= 1) and Σ L² (moments
    2), int64, zeros for the moments not asked for (as the torch path leaves them),
    for each piece of at most PIECE elements (every sum stays below 2**62)."""
    k = _numba_kernels()
    coarse_counts, coarse_moments = k.coarse_counts, k.coarse_moments
    bits = _bits(x)
    for a in range(0, max(1, bits.shape[0]), PIECE):
        piece = bits[a : a + PIECE]
        if moments:
            acc = np.zeros((2, N_COARSE, 3), np.int64)
            coarse_moments(piece, acc[0], acc[1])
            tot = acc[0] + acc[1]
            if moments < 2:
                tot[:, 2] = 0
            yield tot[:, 0].copy(), tot[:, 1].copy(), tot[:, 2].copy()
        else:
            counts = np.zeros((2, N_COARSE), np.int64)
            coarse_counts(piece, counts[0], counts[1])
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
    n = bits.shape[0]
    if n > PIECE:
        return None
    counts = np.zeros((2, N_COARSE), np.int64)
    side = np.empty(max(1, n // SIDE_SHARE), np.int32)
    ns = _numba_kernels().coarse_side(bits, counts[0], counts[1], side)
    if ns < 0:
        return None
    return counts[0] + counts[1], side[:ns]


def fine_histogram_rows(x: torch.Tensor, wanted: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Fine histograms of the wanted coarse buckets: (non-empty low-16-bit bins,
    their counts) per bucket, int64.

    The count tables are int32 (a piece of at most 2**30 entries cannot overflow
    them), one row per wanted bucket and one for every other bucket (no branch in
    the loop), two tables (one per stream) while they are small.
    """
    fine_rows = _numba_kernels().fine_rows
    bits = _bits(x)
    m = len(wanted)
    lut = np.full(N_COARSE, m, np.int32)
    lut[np.asarray(wanted, dtype=np.int64)] = np.arange(m, dtype=np.int32)
    streams = 2 if m <= TWO_STREAM_ROWS else 1
    rows = np.empty((streams, m + 1, N_FINE), np.int32)
    total: np.ndarray | None = None  # int64 sums, only for inputs of several pieces
    for a in range(0, bits.shape[0], PIECE):
        rows[:] = 0
        fine_rows(bits[a : a + PIECE], lut, rows[0], rows[-1])  # one table: both streams
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


def _flat32(x: torch.Tensor) -> np.ndarray:
    """A contiguous flat float32 tensor as a numpy array sharing its memory."""
    import torch

    if x.dtype != torch.float32 or not x.is_contiguous():
        raise TypeError("the apply kernels take contiguous float32 tensors")
    return x.view(-1).numpy()


def cut_block(t: torch.Tensor, lo: tuple[int, int], hi: tuple[int, int], scale: float) -> int:
    """Apply a resolved selection to a whole block in place, in flat order.

    lo/hi are (cut key, the block's ties at that key below the cut), as in
    sparsify.apply_cuts; kept entries become τ·fl32(scale), dropped ones +0.0.
    Returns the kept count."""
    k = _numba_kernels()
    x = _flat32(t)
    bits = x.view(np.int32)
    ends = [
        k.tie_end(bits, np.int64(key), np.int64(quota)) if quota > 0 and key >= 0 else 0
        for key, quota in (lo, hi)
    ]
    kept = k.cut_pass(
        x, np.int64(lo[0]), np.int64(ends[0]), np.int64(hi[0]), np.int64(ends[1]),
        np.float32(scale), scale != 1.0,
    )  # fmt: skip
    return int(kept)


def ties_votes(ts: list[torch.Tensor], weights: list[float]) -> int:
    """Σ sign(Σ_k fl32(w_k)·t_k) over a block, as combine.ties_vote counts it."""
    up, down = _numba_kernels().ties_votes(tuple(_flat32(t) for t in ts), np.float32(weights))
    return int(up) - int(down)


def ties_merge(
    ts: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor,
    scale: float,
    mean: bool,
    majority: int,
    count_cancel: bool,
) -> tuple[int, int]:
    """TIES of a whole block over ts[0] (see the kernel): the bytes of combine.ties
    for finite values, with positive weights when `mean`. Returns (Σ sign of the
    votes, entries whose votes cancel exactly while a task moved, if counted)."""
    up, down, cancel = _numba_kernels().ties_merge(
        tuple(_flat32(t) for t in ts),
        np.float32(weights),
        _flat32(base),
        np.float32(scale),
        mean,
        np.int64(majority),
        count_cancel,
    )
    return int(up) - int(down), int(cancel)


def emr_merge(ts: list[torch.Tensor], masks: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """EMR of a whole block (see the kernel): τ_uni over ts[0], M_k into the rows
    of the bool tensor `masks` (K × n). Returns the per-exponent mantissa sums
    (K × 256, int64) of |t_k| and of |M_k ⊙ τ_uni|; blocks of at most PIECE
    entries keep them below 2**54."""
    arrays = tuple(_flat32(t) for t in ts)
    if arrays[0].shape[0] > PIECE:
        raise ValueError("emr_merge takes blocks of at most PIECE entries")
    k = len(arrays)
    abs_t = np.zeros((k, 256), np.int64)
    abs_u = np.zeros((k, 256), np.int64)
    _numba_kernels().emr_merge(
        arrays, tuple(a.view(np.int32) for a in arrays), masks.numpy(), abs_t, abs_u
    )
    return abs_t, abs_u


# ---------------------------------------------------------------------------------
# raw bf16 inputs (engine/raw.py)
# ---------------------------------------------------------------------------------


def native_raw() -> bool:
    """Whether the kernels of raw bf16 blocks (engine/raw.py, and stream_raw)
    are the C ones (native.py: the same integers and bytes, no numba to load):
    with the backend auto, wherever they build."""
    return _backend == "auto" and native.available()


def _raw_kernels():
    """The kernels of raw bf16 blocks: the C ones where native_raw(), else numba's."""
    return native.kernels() if native_raw() else _numba_kernels()


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


def coarse_sparse_raw(
    base: torch.Tensor, task: torch.Tensor
) -> tuple[np.ndarray, np.ndarray] | None:
    """coarse_sparse of τ = fl32(task) − fl32(base) for bf16 blocks, τ never stored."""
    b, t = _raw16(base), _raw16(task)
    n = b.shape[0]
    if n > PIECE:
        return None
    # two streams' tables, with the C kernel's spare slots for zero keys past
    # the buckets (native.ZERO_SLOTS; numba's leaves them empty): bucket 0's
    counts = np.zeros((2, N_COARSE + native.ZERO_SLOTS), np.int64)
    side = np.empty(max(1, n // SIDE_SHARE), np.int32)
    ns = _raw_kernels().coarse_side_raw(b, t, counts[0], counts[1], side)
    if ns < 0:
        return None
    total = counts[0] + counts[1]
    total[0] += total[N_COARSE:].sum()
    return total[:N_COARSE], side[:ns]


def tie_end_raw(base: torch.Tensor, task: torch.Tensor, key: int, quota: int) -> int:
    """tie_end over τ = fl32(task) − fl32(base) of bf16 blocks (0 if none wanted)."""
    if quota <= 0 or key < 0:
        return 0
    return int(
        _raw_kernels().tie_end_raw(_raw16(base), _raw16(task), np.int64(key), np.int64(quota))
    )


def _out_views(out: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The raw combine kernels' two outputs: (bf16 patterns, empty) or (empty,
    float32), from a bf16/uint16 or float32 tensor or array sharing its memory."""
    if not isinstance(out, np.ndarray):  # a torch tensor: its memory as numpy
        import torch

        out = _raw16(out) if out.dtype == torch.bfloat16 else _flat32(out)
    if out.dtype == np.uint16:  # bf16 patterns
        return _raw16(out), np.empty(0, np.float32)
    if out.dtype == np.float32 and out.flags.c_contiguous:
        return np.empty(0, np.uint16), out.reshape(-1)
    raise TypeError(f"the raw combine kernels write bfloat16 or float32, not {out.dtype}")


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

    cuts: per task (lo key, lo tie end, hi key, hi tie end, scale), as cut_pass
    takes them. Returns the kept count per task, or None when a result is NaN
    (the caller merges the block with torch instead; `out` is then garbage)."""
    k = len(tasks)
    lo_key = np.array([1 << 31 if c[0] < 0 else c[0] for c in cuts], np.int64)
    hi_key = np.array([1 << 31 if c[2] < 0 else c[2] for c in cuts], np.int64)
    lo_end = np.array([c[1] for c in cuts], np.int64)
    hi_end = np.array([c[3] for c in cuts], np.int64)
    scales = np.array([c[4] for c in cuts], np.float32)
    out16, out32 = _out_views(out)
    kept = np.zeros(k, np.int64)
    nan = _raw_kernels().cut_combine_raw(
        _raw16(base), tuple(_raw16(t) for t in tasks), lo_key, lo_end, hi_key, hi_end,
        scales, np.float32(weights), np.float32(scale), np.float32(sum(weights)), average,
        out16, out32, kept,
    )  # fmt: skip
    return None if nan else [int(v) for v in kept]


def stream_raw(
    base: np.ndarray,
    tasks: list[np.ndarray],
    weights: list[float],
    scale: float,
    average: bool,
    out: np.ndarray,
) -> list[float] | None:
    """Task arithmetic (or averaging) of bf16 blocks (uint16 arrays of their
    patterns) into `out` (uint16 for bf16, or float32): engine/stream.py's
    bytes in one pass per task. Returns Σ τ_k² per task (float64 lanes, not
    stream.square_sum's float32 chunks: the report's last digits differ), or
    None when a result is NaN (`out` is then garbage)."""
    out16, out32 = _out_views(out)
    sq = np.zeros(len(tasks), np.float64)
    nan = _raw_kernels().stream_raw(
        _raw16(base), tuple(_raw16(t) for t in tasks), np.float32(weights), np.float32(scale),
        np.float32(sum(weights)), average, out16, out32, sq,
    )  # fmt: skip
    return None if nan else [float(v) for v in sq]
