"""Magnitude keys: the bit pattern of |x| as a non-negative int32.

For finite float32 values, the IEEE-754 bit pattern of |x| (sign bit cleared) is
monotonic in |x|. Sorting, ranking and thresholding |x| can therefore be done on
integer keys, which makes histograms exact (no float binning) and lets -0.0 and
+0.0 share one key, as they share one magnitude.

torch is imported by the functions that take tensors only: SparseKeys (the
raw bf16 path) and the key arithmetic below need none.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

COARSE_SHIFT = 16
N_COARSE = 1 << 15  # top 16 bits of a 31-bit key: sign bit is always 0
N_FINE = 1 << 16  # low 16 bits


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys of |x| for a contiguous float32 tensor (flattened)."""
    import torch

    if x.dtype != torch.float32:
        raise TypeError(f"magnitude_keys needs float32, got {x.dtype}")
    return x.contiguous().view(-1).view(torch.int32) & 0x7FFFFFFF


KEY_CHUNK = 1 << 18  # keys made at a time: they and their masks stay in cache


class KeyChunks:
    """The magnitude keys of a float32 tensor, made chunk by chunk as they are read.

    Statistics passes (histograms, tie scans) iterate over this instead of a
    whole-block key tensor: no 4 bytes per element held, and each chunk's keys
    and masks are still in cache when they are used.
    """

    def __init__(self, x: torch.Tensor, chunk: int | None = None):
        self.x = x.reshape(-1)
        # on a GPU, fewer and larger kernels; 2**20 is the exactness bound of the
        # float64 bincounts that take these chunks (exact.CHUNK)
        default = KEY_CHUNK if self.x.device.type == "cpu" else 1 << 20
        self.chunk = max(1, chunk or default)
        # exact.sparse_keys' answer for this block once asked (False: not sparse),
        # and the histogram.KeysAside made from it
        self.sparse: object = None
        self.aside: object = None

    def __len__(self) -> int:
        return self.x.numel()

    def __iter__(self):
        for a in range(0, self.x.numel(), self.chunk):
            yield magnitude_keys(self.x[a : a + self.chunk])


class SparseKeys(KeyChunks):
    """The keys of a block that was never stored, known by exact.sparse_keys'
    answer alone (kernels.coarse_sparse_raw made it from the raw inputs).

    Every statistic of a sparse block comes from that answer (coarse_stats,
    fine_histograms): nothing iterates over the keys, and iterating is an error
    rather than a silent pass over a stand-in.
    """

    def __init__(self, n: int, counts: np.ndarray, side: np.ndarray):
        self.x = None  # type: ignore[assignment]  (no values: see numel)
        self.n = n
        self.chunk = KEY_CHUNK
        self.sparse = (counts, side)
        self.aside = None

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        raise RuntimeError("SparseKeys holds no keys to iterate: only their sparse counts")


def count_keys(keys: KeyChunks, wanted) -> dict[int, int]:
    """How many keys equal each of `wanted` (a unit's count of a cut's ties)."""
    import torch

    return {key: sum(int(torch.count_nonzero(c == key)) for c in keys) for key in wanted}


def numel(keys) -> int:
    """Entries of a key tensor or KeyChunks (SparseKeys included)."""
    return len(keys) if isinstance(keys, KeyChunks) else keys.numel()


def key_chunks(keys) -> list | KeyChunks:
    """Chunks of keys from a key tensor (split) or a KeyChunks (as is)."""
    if not isinstance(keys, KeyChunks):
        return list(keys.reshape(-1).split(KEY_CHUNK)) if keys.numel() else []
    return keys


def key_to_float(key: int) -> float:
    """The float32 magnitude that a key stands for, as a Python float (exact)."""
    return struct.unpack("<f", struct.pack("<I", key & 0xFFFFFFFF))[0]


def key_mantissa_exponent(key: int) -> tuple[int, int]:
    """(M, e) with |x| = M * 2**(e - 150) exactly, M < 2**24, e >= 1."""
    e = key >> 23
    m = key & 0x7FFFFF
    if e > 0:
        m |= 1 << 23
    return m, max(e, 1)


def key_square_scaled(key: int) -> int:
    """x**2 * 2**298 as an exact integer (the scale used by exact.py)."""
    m, e = key_mantissa_exponent(key)
    return (m * m) << (2 * e - 2)


def key_abs_scaled(key: int) -> int:
    """|x| * 2**149 as an exact integer."""
    m, e = key_mantissa_exponent(key)
    return m << (e - 1)
