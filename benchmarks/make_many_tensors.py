"""Generate a checkpoint of very many tiny tensors (hostile-input class 8).

    python benchmarks/make_many_tensors.py --out /tmp/many --tensors 1000000 --tasks 2

writes OUT/base/model.safetensors and OUT/ft_1 .. OUT/ft_K/model.safetensors, each
holding the same N tensors ``t.{i:07d}`` of shape [size(i)] (4..16 elements) in
float32 or bf16, whose values are a closed-form function of (role, i, j), so a
check can compute any tensor's expected merge without reading the inputs
(:func:`value`). Header and data are streamed in chunks of tensors: no Python
object per tensor is ever held, so a million tensors take seconds and a few MB.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np

CHUNK = 65536  # tensors per generated chunk
MIN_ELEMS, SPAN = 4, 13  # sizes 4..16


def sizes(start: int, stop: int) -> np.ndarray:
    """Element count of tensors start..stop-1 (a function of the index only)."""
    i = np.arange(start, stop, dtype=np.int64)
    return MIN_ELEMS + (i * 7 + i // 13) % SPAN


def value(role: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """float32 value of element j of tensor i; role 0 is the base, k >= 1 fine-tune k.

    The base is spread over [-0.5, 0.5); a fine-tune adds τ_k in steps of 2**-12 with
    a sign and size that differ per task, so magnitude selections have distinct keys
    as well as ties. Every value is exactly representable in bf16 (bits 8+ only).
    """
    i = i.astype(np.int64)
    j = j.astype(np.int64)
    base = (((i * 37 + j * 11) % 256) - 128).astype(np.float32) / np.float32(256)
    if role == 0:
        return base
    tau = (((i * (13 + 4 * role) + j * (5 + role) + role * 101) % 61) - 30).astype(np.float32)
    return (base + tau * np.float32(2**-12)).astype(np.float32)


def _to_dtype(x: np.ndarray, dtype: str) -> bytes:
    if dtype == "F32":
        return x.astype("<f4").tobytes()
    bits = x.astype("<f4").view("<u4") >> 16  # exact: values have no low bits
    return bits.astype("<u2").tobytes()


def header_bytes(n: int, itemsize: int) -> bytes:
    """The JSON header, written entry by entry (json.dumps of a dict is never made)."""
    parts = [b"{"]
    pos = 0
    dt = "F32" if itemsize == 4 else "BF16"
    for s in range(0, n, CHUNK):
        sz = sizes(s, min(n, s + CHUNK))
        ends = pos + np.cumsum(sz * itemsize)
        begins = np.concatenate(([pos], ends[:-1]))
        pos = int(ends[-1])
        parts.append(
            ",".join(
                f'"t.{s + k:07d}":{{"dtype":"{dt}","shape":[{int(sz[k])}],'
                f'"data_offsets":[{int(begins[k])},{int(ends[k])}]}}'
                for k in range(len(sz))
            ).encode()
            + (b"," if s + CHUNK < n else b"")
        )
    parts.append(b"}")
    body = b"".join(parts)
    return body + b" " * (-len(body) % 8)


def write_file(path: Path, role: int, n: int, dtype: str) -> None:
    itemsize = 4 if dtype == "F32" else 2
    path.parent.mkdir(parents=True, exist_ok=True)
    head = header_bytes(n, itemsize)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        del head
        for s in range(0, n, CHUNK):
            sz = sizes(s, min(n, s + CHUNK))
            i = np.repeat(np.arange(s, s + len(sz)), sz)
            starts = np.cumsum(sz) - sz
            j = np.arange(len(i)) - np.repeat(starts, sz)
            f.write(_to_dtype(value(role, i, j), dtype))
    os.replace(tmp, path)


def generate(out: Path, n: int, tasks: int, dtype: str) -> None:
    write_file(out / "base" / "model.safetensors", 0, n, dtype)
    for k in range(1, tasks + 1):
        write_file(out / f"ft_{k}" / "model.safetensors", k, n, dtype)
    (out / "manifest.json").write_text(
        json.dumps({"generator": "make_many_tensors", "tensors": n, "tasks": tasks, "dtype": dtype})
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tensors", type=int, default=1_000_000)
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--dtype", choices=["F32", "BF16"], default="F32")
    a = ap.parse_args(argv)
    generate(a.out, a.tensors, a.tasks, a.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
