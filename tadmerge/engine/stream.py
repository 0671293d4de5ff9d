"""Merges that need nothing but the block itself, streamed from the raw inputs.

Task arithmetic and averaging without a sparsifier make each output entry from
the same entry of the K+1 inputs. The inputs stay in their own dtype (bf16:
half the bytes) and each cache-sized chunk is widened, subtracted, squared,
combined and narrowed to the output dtype while it is in cache. The arithmetic
is combine.task_arithmetic / combine.average's, in the same order, so the bytes
are the same (tests/test_engine_stream.py).

In numpy, not torch: these are the only merges that need no statistics, and
a merge made of them alone (task arithmetic, averaging) then never imports
torch, whose import takes ~2 s on a 2-core VM: more than reading and writing a
271M-parameter merge of three fine-tunes from a warm page cache. numpy's
ufuncs on cache-resident chunks also cost less per element than torch's
(~1.0 against 1.87 ns per element and task, benchmarks/kernel_costs.py), and
release the GIL, so the executor's threads run them in parallel.

On bf16 inputs a compiled kernel does the same in one pass per task, the
same bytes: kernels.stream_raw, in C (native.py, ~0.46 ns per element and
task), or where no C compiler runs in numba (~0.7 ns) on large
merges (below about 1.5 GB of inputs loading numba costs more than it saves).
The caller decides, once per merge (cluster/worker.stream_kernel). Their
report norms are float64 sums (the two kernels' to the bit), so the last
digits differ from this path's float32 chunk sums; the bytes do not.

bf16 has no numpy dtype: its blocks are uint16 arrays of the bit patterns,
widened by a shift into the high half of a float32 and narrowed by rounding
to nearest even, as torch does. NaN (only with inputs.allow_nonfinite) stays
NaN, but its bits are not torch's: torch itself writes 0xFFFF or 0x7FC0 for
a bf16 NaN depending on whether its vectorised loop or its scalar tail
converts it (SPEC does not fix them).
"""

from __future__ import annotations

import math

import numpy as np

from . import kernels
from .spec import MergeSpec, NonFiniteTaskVector, TaskStats

# Elements per chunk: the chunk's few float32 temporaries stay in L2 (measured
# best among 2^14..2^18 on a 2 MB-L2 Xeon).
STREAM_CHUNK = 1 << 16

# the safetensors dtypes a block may stream in, as numpy arrays of these
# (BF16: the bit patterns)
NP_DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(np.uint16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
}


def streams(spec: MergeSpec, device: str, dtypes: list[str]) -> bool:
    """Whether a block of this merge can be merged by merge_raw: CPU only (on a
    GPU the whole block is one chunk anyway), inputs and output in NP_DTYPES."""
    return (
        device == "cpu"
        and spec.sparsify.method == "none"
        and spec.method in ("task_arithmetic", "average")
        and all(d in NP_DTYPES for d in dtypes)
    )


def _widen(src: np.ndarray, f32: np.ndarray, u32: np.ndarray, packed: bool) -> np.ndarray:
    """src (any NP_DTYPES array) as float32 into f32 (u32: the same buffer).

    packed (bf16 of even length): the pairs of 16-bit patterns read as one
    uint32 each give the even entries by a shift and the odd ones by a mask,
    into the first and second half of f32: one pass over the input and none
    of numpy's slow uint16 -> uint32 cast. Every operation after it is per
    entry, so the order only has to be undone when narrowing.
    """
    if packed:
        pairs = src.view(np.uint32)
        h = pairs.size
        np.left_shift(pairs, 16, out=u32[:h])
        np.bitwise_and(pairs, 0xFFFF0000, out=u32[h:])
    elif src.dtype == np.uint16:  # bf16: its bits are a float32's high half
        np.copyto(u32, src, casting="unsafe")
        np.left_shift(u32, 16, out=u32)
    else:
        np.copyto(f32, src, casting="same_kind")
    return f32


def _narrow(acc: np.ndarray, out: np.ndarray, tmp: np.ndarray, packed: bool) -> None:
    """acc (float32) rounded to out's dtype, nearest even; tmp: uint32 scratch.
    packed: acc holds the even entries, then the odd ones (see _widen)."""
    if out.dtype != np.uint16:
        np.copyto(out, acc, casting="same_kind")
        return
    u = acc.view(np.uint32)
    np.right_shift(u, 16, out=tmp)
    np.bitwise_and(tmp, 1, out=tmp)
    np.add(tmp, 0x7FFF, out=tmp)
    np.add(tmp, u, out=tmp)  # the bf16 pattern is now tmp's high half
    if packed:
        h = tmp.size // 2
        pairs = out.view(np.uint32)
        np.right_shift(tmp[:h], 16, out=pairs)
        np.bitwise_and(tmp[h:], 0xFFFF0000, out=tmp[h:])
        np.bitwise_or(pairs, tmp[h:], out=pairs)
    else:
        np.right_shift(tmp, 16, out=tmp)
        np.copyto(out, tmp, casting="unsafe")
    if not math.isfinite(_dot(acc, acc)):
        # the sum above may have carried a NaN into Inf or 0
        nan = np.isnan(acc)
        if packed:
            out[0::2][nan[:h]] = 0x7FC0
            out[1::2][nan[h:]] = 0x7FC0
        else:
            out[nan] = 0x7FC0


def _dot(x: np.ndarray, y: np.ndarray) -> float:
    """Σ x·y in float32 (BLAS: half the time of numpy's einsum loop, measured
    with two executor threads each calling it)."""
    return float(np.dot(x, y))


def square_sum(x: np.ndarray) -> float:
    """Σx² for the report (float32 accumulation: one fast pass, not exact). A
    non-finite result means NaN/Inf in x, or squares beyond float32's range:
    the latter is told apart with isfinite (and then summed in float64)."""
    v = _dot(x, x)
    if not math.isfinite(v) and bool(np.isfinite(x).all()):
        x64 = x.astype(np.float64)
        v = _dot(x64, x64)
    return v


def merge_raw(
    base: np.ndarray,
    models: list[np.ndarray],
    out: np.ndarray,
    spec: MergeSpec,
    check_finite: bool = True,
    kernel: bool = False,
) -> list[TaskStats]:
    """Merge one block from the inputs' own values into `out` (the output dtype).

    `base`, `models` and `out` are flat arrays of equal length in NP_DTYPES'
    types; the inputs are not modified. Raises NonFiniteTaskVector as
    merge_block does (unless check_finite=False), in which case `out` holds
    part of the block and must not be written. `kernel`: bf16 inputs go
    through kernels.stream_raw (C or numba, loaded by the caller), the same
    bytes.
    """
    bf16 = all(x.dtype == np.uint16 for x in (base, *models))
    if kernel and bf16 and out.dtype in (np.uint16, np.float32):
        sq = kernels.stream_raw(
            base, models, list(spec.weights), spec.scale, spec.method == "average", out
        )
        if sq is not None:  # (None: a NaN result, which the numpy path below writes)
            for k, s in enumerate(sq):
                if check_finite and not math.isfinite(s):
                    raise NonFiniteTaskVector(k)
            return [TaskStats(kept=base.size, tau_sq=s, t_sq=s) for s in sq]
    with np.errstate(over="ignore", invalid="ignore"):  # Inf/NaN are reported, not warned
        return _merge_raw(base, models, out, spec, check_finite)


def _merge_raw(
    base: np.ndarray,
    models: list[np.ndarray],
    out: np.ndarray,
    spec: MergeSpec,
    check_finite: bool,
) -> list[TaskStats]:
    n = base.size
    weights = [np.float32(w) for w in spec.weights]
    step = min(n, STREAM_CHUNK) or 1
    base_u = np.empty(step, np.uint32)
    acc_u = np.empty(step, np.uint32)
    tau_u = np.empty(step, np.uint32)
    tmp = np.empty(step, np.uint32)
    base_f, acc_f, tau_f = base_u.view(np.float32), acc_u.view(np.float32), tau_u.view(np.float32)
    scale = np.float32(spec.scale)
    total_w = np.float32(sum(spec.weights))
    sq = [0.0] * len(models)
    average = spec.method == "average"
    bf16 = out.dtype == np.uint16 and all(x.dtype == np.uint16 for x in (base, *models))
    for a in range(0, n, step):
        b = min(n, a + step)
        m = b - a
        packed = bf16 and m % 2 == 0  # (step is even: only a last chunk may be odd)
        bv = _widen(base[a:b], base_f[:m], base_u[:m], packed)
        acc = acc_f[:m]
        for k, model in enumerate(models):
            # τ_k for the report (and the finite check); task arithmetic sums it
            first = k == 0
            t = _widen(
                model[a:b], acc if first else tau_f[:m], acc_u[:m] if first else tau_u[:m], packed
            )
            if average:
                # averaging sums θ_k, not τ_k: τ_k is made for the report only
                tau = np.subtract(t, bv, out=tmp[:m].view(np.float32))
            else:
                tau = np.subtract(t, bv, out=t)
            s = square_sum(tau)
            if check_finite and not math.isfinite(s):
                raise NonFiniteTaskVector(k)
            sq[k] += s
            if weights[k] != 1.0:
                np.multiply(t, weights[k], out=t)
            if not first:
                np.add(acc, t, out=acc)
        if average:
            np.divide(acc, total_w, out=acc)
        else:
            if scale != 1.0:
                np.multiply(acc, scale, out=acc)
            np.add(acc, bv, out=acc)
        _narrow(acc, out[a:b], tmp[:m], packed)
    return [TaskStats(kept=n, tau_sq=s, t_sq=s) for s in sq]
