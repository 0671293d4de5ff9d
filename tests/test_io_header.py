"""read_header: good files, a catalogue of hostile ones, and a fuzz of arbitrary bytes."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from tadmerge.errors import InputError
from tadmerge.io.safetensors_format import (
    DTYPE_SIZE,
    FLOAT_DTYPES,
    SafetensorsHeader,
    dtype_name,
    read_header,
    torch_dtype,
)


def write_raw(path, header, data: bytes = b"", prefix: int | None = None) -> str:
    """A safetensors-shaped file from a header object (or raw header bytes)."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(body) if prefix is None else prefix
    path.write_bytes(struct.pack("<Q", n) + body + data)
    return str(path)


def problems_of(path: str, **kw) -> tuple[InputError, str]:
    with pytest.raises(InputError) as info:
        read_header(path, **kw)
    return info.value, str(info.value)


def test_dtype_tables() -> None:
    for name in ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"]:
        dt, size = torch_dtype(name), DTYPE_SIZE[name]
        assert dt.itemsize == size
        assert dtype_name(dt) == name
    assert {"F8_E4M3", "F8_E5M2"} <= set(DTYPE_SIZE)
    for name, size in DTYPE_SIZE.items():  # every name this torch knows maps both ways
        assert torch_dtype(name).itemsize == size and dtype_name(torch_dtype(name)) == name
    assert {"F32", "BF16", "F16", "F64", "F8_E4M3"} <= FLOAT_DTYPES
    assert "I32" not in FLOAT_DTYPES and "BOOL" not in FLOAT_DTYPES
    with pytest.raises(ValueError):
        dtype_name(torch.complex64)


def test_good_file(tmp_path) -> None:
    tensors = {
        "w": torch.randn(3, 5),
        "b": torch.ones(5, dtype=torch.bfloat16),
        "s": torch.tensor(3, dtype=torch.int64),
        "e": torch.zeros(0, 4),
        "m": torch.tensor([True, False]),
    }
    path = str(tmp_path / "m.safetensors")
    save_file(tensors, path, metadata={"format": "pt", "who": "test"})
    h = read_header(path)
    assert isinstance(h, SafetensorsHeader)
    assert h.path == path and h.file_size == os.path.getsize(path)
    assert h.metadata == {"format": "pt", "who": "test"}
    assert set(h.tensors) == set(tensors)
    raw = open(path, "rb").read()
    for name, t in tensors.items():
        e = h.tensors[name]
        assert e.file == path and e.shape == tuple(t.shape) and e.torch_dtype == t.dtype
        assert e.nbytes == t.numel() * t.element_size()
        assert e.offset >= h.data_start
        got = torch.frombuffer(
            bytearray(raw[e.offset : e.offset + e.nbytes]) or bytearray(1), dtype=torch.uint8
        )
        if e.nbytes:
            assert torch.equal(got.view(t.dtype).reshape(t.shape), t)
    s = h.tensors["s"]
    assert (s.numel, s.rows, s.row_numel) == (1, 1, 1)
    w = h.tensors["w"]
    assert (w.numel, w.rows, w.row_numel, w.itemsize, w.is_float) == (15, 3, 5, 4, True)
    assert h.tensors["e"].rows == 0 and h.tensors["e"].row_numel == 4
    assert not h.tensors["m"].is_float


def test_short_file(tmp_path) -> None:
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\x01\x02\x03")
    err, msg = problems_of(str(p))
    assert str(p) in msg and "shorter than the 8-byte" in msg


def test_header_length_past_eof(tmp_path) -> None:
    p = write_raw(tmp_path / "h.safetensors", {"a": {}}, prefix=10_000)
    _, msg = problems_of(p)
    assert p in msg and "past the end of the file" in msg


def test_bogus_huge_length_prefix_is_cheap(tmp_path) -> None:
    p = write_raw(tmp_path / "huge.safetensors", b"{}", prefix=2**63 + 12345)
    _, msg = problems_of(p)
    assert p in msg and "exceeds the limit" in msg
    p2 = write_raw(tmp_path / "cap.safetensors", b"{}" + b" " * 62)
    _, msg = problems_of(p2, max_header_bytes=32)
    assert "exceeds the limit of 32" in msg


def test_not_json_not_utf8_not_object(tmp_path) -> None:
    _, msg = problems_of(write_raw(tmp_path / "a.safetensors", b"{not json"))
    assert "not valid JSON" in msg
    _, msg = problems_of(write_raw(tmp_path / "b.safetensors", b"\xff\xfe{}"))
    assert "not valid UTF-8" in msg
    _, msg = problems_of(write_raw(tmp_path / "c.safetensors", b"[1, 2]"))
    assert "must be a JSON object" in msg
    deep = b"[" * 100_000 + b"]" * 100_000
    _, msg = problems_of(write_raw(tmp_path / "d.safetensors", deep))
    assert "nested too deeply" in msg or "not valid JSON" in msg


def entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def test_unknown_dtype(tmp_path) -> None:
    p = write_raw(tmp_path / "u.safetensors", {"w": entry(dtype="F128")}, b"\0" * 8)
    err, msg = problems_of(p)
    assert err.problems[0].tensor == "w" and err.problems[0].file == p
    assert "unknown dtype 'F128'" in msg


@pytest.mark.parametrize(
    "shape, text",
    [
        ([-2], "negative"),
        ([True], "not an integer"),
        ([2.0], "not an integer"),
        (["2"], "not an integer"),
    ],
)
def test_bad_dims(tmp_path, shape, text) -> None:
    p = write_raw(tmp_path / "d.safetensors", {"w": entry(shape=shape)}, b"\0" * 8)
    err, msg = problems_of(p)
    assert f"{p} [w]" in msg and text in msg


def test_huge_dims_are_cheap(tmp_path) -> None:
    p = write_raw(tmp_path / "d.safetensors", {"w": entry(shape=[10**40] * 2000)}, b"\0" * 8)
    _, msg = problems_of(p)
    assert "larger than any real tensor" in msg


def test_offsets_mismatch_and_bad_offsets(tmp_path) -> None:
    header = {
        "a": entry(offsets=(0, 12)),
        "b": entry(offsets=(8, 4)),
        "c": entry(offsets=(0,)),
        "d": entry(offsets=(True, 8)),
        "e": {"dtype": "F32", "shape": [2]},
        "f": "not an object",
        "g": entry(offsets=(-8, 0)),
    }
    p = write_raw(tmp_path / "o.safetensors", header, b"\0" * 16)
    err, msg = problems_of(p)
    by = {pr.tensor: pr.message for pr in err.problems}
    assert "needs 8" in by["a"] and "span 12 bytes" in by["a"]
    assert "before begin" in by["b"]
    assert "two integers" in by["c"] and "two integers" in by["d"]
    assert "missing data_offsets" in by["e"]
    assert "JSON object" in by["f"]
    assert "negative" in by["g"]
    assert msg.startswith("7 input problem(s)")


def test_truncated_file(tmp_path) -> None:
    p = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(4), "b": torch.zeros(100)}, str(p))
    full = p.read_bytes()
    p.write_bytes(full[:-10])
    err, msg = problems_of(str(p))
    assert f"truncated: needs {len(full)} bytes, file has {len(full) - 10}" in msg
    assert err.problems[0].tensor == "b"


def test_overlapping_tensors(tmp_path) -> None:
    header = {"a": entry(shape=(4,), offsets=(0, 16)), "b": entry(offsets=(8, 16))}
    p = write_raw(tmp_path / "ov.safetensors", header, b"\0" * 16)
    err, msg = problems_of(p)
    assert err.problems[0].tensor == "b" and "overlaps tensor 'a'" in msg


def test_empty_tensors_do_not_overlap(tmp_path) -> None:
    header = {"a": entry(shape=(2,), offsets=(0, 8)), "z": entry(shape=(0,), offsets=(4, 4))}
    p = write_raw(tmp_path / "ok.safetensors", header, b"\0" * 8)
    assert set(read_header(p).tensors) == {"a", "z"}


def test_bad_metadata_and_duplicate_keys(tmp_path) -> None:
    p = write_raw(tmp_path / "m.safetensors", {"__metadata__": {"k": 1}}, b"")
    _, msg = problems_of(p)
    assert "__metadata__ must be an object of string -> string" in msg
    body = (
        b'{"w": ' + json.dumps(entry()).encode() + b', "w": ' + json.dumps(entry()).encode() + b"}"
    )
    p = write_raw(tmp_path / "dup.safetensors", body, b"\0" * 8)
    _, msg = problems_of(p)
    assert "repeats the key 'w'" in msg


def test_all_problems_reported_together(tmp_path) -> None:
    header = {"a": entry(dtype="X"), "b": entry(shape=(-1,)), "c": entry(offsets=(0, 4))}
    p = write_raw(tmp_path / "many.safetensors", header, b"\0" * 8)
    err, _ = problems_of(p)
    assert {pr.tensor for pr in err.problems} == {"a", "b", "c"}


def test_missing_file_and_fifo(tmp_path) -> None:
    _, msg = problems_of(str(tmp_path / "absent.safetensors"))
    assert "cannot open" in msg
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    _, msg = problems_of(str(fifo))  # must not block waiting for a writer
    assert "not a regular file" in msg


# --------------------------------------------------------------------------- fuzz


def _check_invariants(h: SafetensorsHeader) -> None:
    spans = []
    for e in h.tensors.values():
        assert e.offset >= h.data_start and e.offset + e.nbytes <= h.file_size
        assert e.nbytes == e.numel * e.itemsize
        if e.nbytes:
            spans.append((e.offset, e.offset + e.nbytes))
    spans.sort()
    for (_, end), (begin, _) in zip(spans, spans[1:], strict=False):
        assert begin >= end


def _try(path: str) -> None:
    try:
        h = read_header(path, max_header_bytes=1 << 16)
    except InputError as exc:
        assert exc.problems and all(p.file == path for p in exc.problems)
    else:
        _check_invariants(h)


@pytest.fixture(scope="module")
def valid_file_bytes(tmp_path_factory) -> bytes:
    p = tmp_path_factory.mktemp("fuzz") / "seed.safetensors"
    save_file(
        {
            "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
            "b": torch.ones(3, dtype=torch.int8),
        },
        str(p),
        metadata={"k": "v"},
    )
    return p.read_bytes()


FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@FUZZ
@given(data=st.binary(max_size=200))
def test_fuzz_random_bytes(tmp_path, data) -> None:
    p = tmp_path / "fuzz.safetensors"
    p.write_bytes(data)
    _try(str(p))


@FUZZ
@given(
    prefix=st.one_of(st.integers(0, 2**64 - 1), st.integers(-16, 16)),
    edits=st.lists(
        st.tuples(st.integers(0, 10_000), st.binary(min_size=0, max_size=3)), max_size=4
    ),
    cut=st.integers(0, 10_000),
)
def test_fuzz_mutated_valid_file(tmp_path, valid_file_bytes, prefix, edits, cut) -> None:
    (n,) = struct.unpack("<Q", valid_file_bytes[:8])
    header = bytearray(valid_file_bytes[8 : 8 + n])
    for pos, repl in edits:  # overwrite/insert/delete bytes in the JSON
        pos %= len(header) + 1
        header[pos : pos + (1 if repl else 2)] = repl
    body = bytes(header) + valid_file_bytes[8 + n :]
    length = prefix if prefix >= 16 else max(0, len(header) + prefix)
    raw = struct.pack("<Q", length) + body
    raw = raw[: len(raw) - (cut % 12)]
    p = tmp_path / "mut.safetensors"
    p.write_bytes(raw)
    _try(str(p))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3)
    ),
    max_leaves=8,
)


@settings(FUZZ, max_examples=150)
@given(
    entries=st.dictionaries(
        st.sampled_from(["a", "b", "__metadata__", ""]),
        st.fixed_dictionaries(
            {},
            optional={
                "dtype": st.sampled_from(["F32", "I8", "BOOL", "BF16", "nope"]) | json_values,
                "shape": st.lists(st.integers(-2, 5), max_size=3) | json_values,
                "data_offsets": st.lists(st.integers(-4, 40), min_size=2, max_size=2) | json_values,
            },
        )
        | json_values,
        max_size=3,
    ),
    data_len=st.integers(0, 48),
)
def test_fuzz_structured_headers(tmp_path, entries, data_len) -> None:
    p = write_raw(tmp_path / "s.safetensors", json.dumps(entries).encode(), b"\0" * data_len)
    _try(p)
