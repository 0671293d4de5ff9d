"""Block I/O: read_rows against safetensors' own loader; layout + pwrite round trips."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tadmerge.errors import InputChangedError, InputError, MergeRuntimeError
from tadmerge.io import block_io
from tadmerge.io.block_io import (
    OutputTensor,
    ShardSpec,
    close_all,
    create_shard_files,
    index_json,
    layout_shards,
    map_bytes,
    prefetch_rows,
    read_bytes,
    read_rows,
    sync_all,
    write_at,
)
from tadmerge.io.safetensors_format import DTYPE_SIZE, read_header, torch_dtype


@pytest.fixture(autouse=True)
def _close_fds():
    yield
    close_all()


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random values of any dtype, built from random bytes (covers bf16, fp8, bool, uint)."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for d in shape:
        n *= d
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw = raw % 2
    elif dtype.is_floating_point:
        # avoid NaN bit patterns so torch.equal is meaningful
        return torch.randn(shape, generator=g).to(dtype)
    return raw.view(dtype).reshape(shape)


ALL_DTYPES = sorted(DTYPE_SIZE)


def test_read_rows_matches_safetensors_for_every_dtype(tmp_path) -> None:
    tensors = {}
    for i, name in enumerate(ALL_DTYPES):
        dt = torch_dtype(name)
        tensors[f"{name}.m"] = sample(dt, (5, 3), seed=i)
        tensors[f"{name}.v"] = sample(dt, (7,), seed=100 + i)
        tensors[f"{name}.s"] = sample(dt, (), seed=200 + i)
        tensors[f"{name}.e"] = sample(dt, (0, 4), seed=300 + i)
        tensors[f"{name}.c"] = sample(dt, (4, 2, 3), seed=400 + i)
    path = str(tmp_path / "all.safetensors")
    save_file(tensors, path)
    ref = load_file(path)
    header = read_header(path)
    for name, expected in ref.items():
        entry = header.tensors[name]
        flat = expected.reshape(-1)
        full = read_rows(entry, 0, entry.rows)
        assert full.dtype == expected.dtype and full.dim() == 1
        assert torch.equal(full.view(torch.uint8), flat.view(torch.uint8)), name
        rows = entry.rows
        for a, b in [(0, 0), (1, rows), (0, max(rows - 1, 0)), (rows // 2, rows)]:
            if a > b:
                continue
            part = read_rows(entry, a, b)
            want = flat[a * entry.row_numel : b * entry.row_numel]
            assert torch.equal(part.view(torch.uint8), want.view(torch.uint8)), (name, a, b)


def test_read_rows_0d_and_bounds(tmp_path) -> None:
    path = str(tmp_path / "s.safetensors")
    save_file({"s": torch.tensor(2.5)}, path)
    e = read_header(path).tensors["s"]
    assert read_rows(e, 0, 1).tolist() == [2.5]
    with pytest.raises(ValueError):
        read_rows(e, 0, 2)


def test_read_rows_short_file(tmp_path) -> None:
    """A file truncated after its header was read is a changed input (its size is
    not the planned one) for every read; an entry made by hand (no identity)
    reads the rows still there and reports the missing ones as a short read; a
    file gone is an OS error (a runtime error: exit 4, not a bad input)."""
    path = str(tmp_path / "t.safetensors")
    save_file({"a": torch.zeros(8, 4)}, path)
    e = read_header(path).tensors["a"]
    os.truncate(path, os.path.getsize(path) - 40)  # truncated after the header check
    for rows in [(0, 8), (0, 2)]:
        with pytest.raises(InputChangedError) as info:
            read_rows(e, *rows)
        text = str(info.value)
        assert f"{path} [a]: changed during the merge: size changed" in text, text
    bare = dataclasses.replace(e, identity=None)
    with pytest.raises(InputError) as info:
        read_rows(bare, 0, 8)
    assert path in str(info.value) and "[a]" in str(info.value) and "short read" in str(info.value)
    assert read_rows(bare, 0, 2).numel() == 8  # rows still present read fine
    os.remove(path)
    close_all()
    with pytest.raises(MergeRuntimeError, match=r"\(ENOENT\)"):
        read_rows(e, 0, 1)


def _big_file(tmp_path, rows: int = 2048, cols: int = 300):
    """A file whose second tensor starts at an 8-aligned offset and holds more
    than block_io.MAP_MIN_BYTES, the size from which map_bytes maps."""
    path = str(tmp_path / "big.safetensors")
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "a": torch.randn(3, 4, generator=g).to(torch.bfloat16),
            "w": torch.randn(rows, cols, generator=g).to(torch.bfloat16),
        },
        path,
    )
    return path, read_header(path).tensors["w"]


@pytest.mark.skipif(not block_io._map_ok, reason="no mmap.madvise here")
def test_map_bytes_are_the_read_bytes(tmp_path) -> None:
    path, e = _big_file(tmp_path)
    assert e.offset % 8 == 0
    for r0, r1 in [(0, e.rows), (100, 2000)]:
        got = map_bytes(e, r0, r1)
        if got is None:  # a kernel without MADV_POPULATE_READ: map_bytes says read
            assert not block_io._map_ok
            return
        assert got.flags.writeable and got.flags.c_contiguous
        assert (got == read_bytes(e, r0, r1)).all()
    # small ranges are read, not mapped
    assert map_bytes(e, 0, 3) is None
    # the array is copy-on-write: the file never changes under it
    before = read_bytes(e, 0, e.rows)
    got = map_bytes(e, 0, e.rows)
    got[:] = 0
    del got
    assert (read_bytes(e, 0, e.rows) == before).all()


def test_map_bytes_misaligned_offset_is_read(tmp_path) -> None:
    path, e = _big_file(tmp_path)
    shifted = dataclasses.replace(e, offset=e.offset + 2)
    assert map_bytes(shifted, 0, 1000) is None


@pytest.mark.skipif(not block_io._map_ok, reason="no mmap.madvise here")
def test_map_bytes_short_file(tmp_path) -> None:
    path, e = _big_file(tmp_path)
    os.truncate(path, os.path.getsize(path) - 4096)  # truncated after the header check
    with pytest.raises(InputChangedError) as info:
        map_bytes(e, 0, e.rows)
    assert f"{path} [w]: changed during the merge: size changed" in str(info.value)
    with pytest.raises(InputError) as info:
        map_bytes(dataclasses.replace(e, identity=None), 0, e.rows)
    assert path in str(info.value) and "[w]" in str(info.value)
    assert "short read" in str(info.value)
    close_all()


@pytest.mark.skipif(not block_io._map_ok, reason="no mmap.madvise here")
@pytest.mark.parametrize("libc", [True, False])
def test_populate_of_a_hole_is_an_oserror(tmp_path, monkeypatch, libc) -> None:
    """The populate (libc's madvise through ctypes, else mmap.madvise) fills a
    map in, and reports a file that shrank under it as EFAULT, not a SIGBUS
    later: map_bytes turns that into the short-read InputError."""
    import errno
    import mmap

    if not libc:
        monkeypatch.setattr(block_io, "_madvise", None)
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * 64)  # 4 pages
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    block_io._populate(mm)
    assert mm[:256] == bytes(range(256))
    os.truncate(path, 0)
    with pytest.raises(OSError) as info:
        block_io._populate(mm)
    assert info.value.errno == errno.EFAULT
    mm.close()  # nothing of the populate still holds the map


def test_prefetch_rows_is_advice_only(tmp_path, monkeypatch) -> None:
    """Prefetching asks the kernel for the rows' pages and changes nothing else:
    the rows read the same, and a missing file or a platform without
    posix_fadvise is not an error (the read that follows reports it)."""
    path = str(tmp_path / "p.safetensors")
    x = sample(torch.bfloat16, (64, 33))
    save_file({"x": x}, path)
    e = read_header(path).tensors["x"]
    advised = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda *a: (advised.append(a[1:]), real(*a))[1])
    prefetch_rows(e, 10, 20)
    prefetch_rows(e, 5, 5)  # nothing to ask for
    assert advised == [(e.offset + 10 * 66, 10 * 66, os.POSIX_FADV_WILLNEED)]
    assert torch.equal(read_rows(e, 10, 20).view(10, 33), x[10:20])
    os.remove(path)
    close_all()
    prefetch_rows(e, 0, 64)  # no error
    monkeypatch.delattr(os, "posix_fadvise")
    prefetch_rows(e, 0, 64)
    with pytest.raises(MergeRuntimeError, match=path):
        read_rows(e, 0, 1)


def test_fd_cache_keeps_the_planned_version_of_a_replaced_file(tmp_path) -> None:
    """An entry is read from the version of the file its header came from: a path
    replaced meanwhile is never reopened under the old offsets. The descriptor
    already open still reads the planned version, and tells that it lost its
    name; a new one (another process, an evicted descriptor) sees another
    inode. Both are a changed input. An entry without an identity (made by
    hand) follows the path, as the write cache does."""
    path = str(tmp_path / "r.safetensors")
    save_file({"a": torch.zeros(4)}, path)
    e = read_header(path).tensors["a"]
    assert read_rows(e, 0, 4).tolist() == [0.0] * 4
    tmp = str(tmp_path / "new.safetensors")
    save_file({"a": torch.ones(4)}, tmp, metadata={"longer": "header " * 9})
    os.replace(tmp, path)  # same name, new inode, data at other offsets
    with pytest.raises(InputChangedError, match="no name left"):
        read_rows(e, 0, 4)
    close_all()
    with pytest.raises(InputChangedError, match="replaced by another file"):
        read_rows(e, 0, 4)
    new = read_header(path).tensors["a"]
    assert read_rows(new, 0, 4).tolist() == [1.0] * 4
    bare = dataclasses.replace(new, identity=None)
    tmp = str(tmp_path / "third.safetensors")
    save_file({"a": torch.full((4,), 2.0)}, tmp, metadata={"longer": "header " * 9})
    os.replace(tmp, path)
    assert read_rows(bare, 0, 4).tolist() == [2.0] * 4
    close_all()


def test_fd_cache_sees_a_rewrite_in_place_with_size_and_mtime_kept(tmp_path) -> None:
    """cp -p / rsync -t / utime back: the open descriptor's ctime moves."""
    path = str(tmp_path / "p.safetensors")
    save_file({"a": torch.zeros(4)}, path)
    e = read_header(path).tensors["a"]
    assert read_rows(e, 0, 4).tolist() == [0.0] * 4
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(e.offset)
        f.write(torch.ones(4).numpy().tobytes())
    while os.stat(path).st_ctime_ns == st.st_ctime_ns:  # (a coarse clock's tick)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns and os.stat(path).st_size == st.st_size
    with pytest.raises(InputChangedError, match="ctime moved"):
        read_rows(e, 0, 4)
    close_all()


def test_concurrent_reads_with_eviction(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(block_io, "_READ_FDS", block_io._FdCache(os.O_RDONLY, maxsize=3))
    entries = []
    for i in range(10):
        p = str(tmp_path / f"f{i}.safetensors")
        save_file({"a": torch.full((16, 4), float(i))}, p)
        entries.append(read_header(p).tensors["a"])

    def work(k: int) -> bool:
        e = entries[k % 10]
        return bool((read_rows(e, k % 8, 16) == float(k % 10)).all())

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(400)))
    assert len(block_io._READ_FDS._entries) <= 3


# --------------------------------------------------------------------------- layout


def outs(spec: dict[str, tuple[str, tuple[int, ...]]]) -> list[OutputTensor]:
    return [OutputTensor(n, d, s) for n, (d, s) in spec.items()]


def test_layout_single_and_many() -> None:
    ts = outs({"b": ("F32", (4,)), "a": ("F32", (4,)), "c": ("F32", (2,))})
    (one,) = layout_shards(ts, shard_size=1 << 20)
    assert one.filename == "model.safetensors"
    assert [t.name for t in one.tensors] == ["a", "b", "c"]
    assert one.file_size == len(one.header) + 40
    many = layout_shards(ts, shard_size=16)
    assert [s.filename for s in many] == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]
    greedy = layout_shards(ts, shard_size=24)
    assert [[t.name for t in s.tensors] for s in greedy] == [["a"], ["b", "c"]]
    big = layout_shards(outs({"a": ("F32", (1,)), "b": ("F32", (100,)), "c": ("F32", (1,))}), 8)
    assert [[t.name for t in s.tensors] for s in big] == [["a"], ["b"], ["c"]]
    assert layout_shards([], 10)[0].filename == "model.safetensors"
    with pytest.raises(ValueError):
        layout_shards(outs({"a": ("F32", (1,))}) * 2, 10)
    with pytest.raises(ValueError):
        OutputTensor("x", "F99", (1,))


def test_header_bytes_deterministic_padded_aligned() -> None:
    ts = outs({"z": ("BOOL", (3,)), "a": ("F64", (2,)), "m": ("BF16", (5,)), "k": ("I32", (1,))})
    s1 = layout_shards(ts, 1 << 20, {"merge": "tadrop", "b": "2"})[0]
    s2 = layout_shards(list(reversed(ts)), 1 << 20, {"b": "2", "merge": "tadrop"})[0]
    assert s1.header == s2.header and s1.data_offsets == s2.data_offsets
    (n,) = struct.unpack("<Q", s1.header[:8])
    assert n == len(s1.header) - 8 and n % 8 == 0
    doc = json.loads(s1.header[8:])
    assert doc["__metadata__"] == {"format": "pt", "merge": "tadrop", "b": "2"}
    for t in ts:
        begin, end = s1.data_offsets[t.name]
        assert end - begin == t.nbytes
        assert s1.tensor_offset(t.name) % DTYPE_SIZE[t.dtype] == 0  # aligned


def test_layout_write_roundtrip_through_safetensors(tmp_path) -> None:
    tensors = {
        "a.weight": torch.randn(6, 5),
        "b.scalar": torch.tensor(1.25),
        "c.bf16": torch.randn(3, 4).to(torch.bfloat16),
        "d.mask": torch.tensor([[True, False, True]]),
        "e.empty": torch.zeros(0, 7),
        "f.fp8": torch.randn(9).to(torch.float8_e4m3fn),
        "g.int": torch.arange(11, dtype=torch.int64),
        "h.half": torch.randn(2, 2, 2).half(),
    }
    specs = [OutputTensor.like(n, t) for n, t in tensors.items()]
    shards = layout_shards(specs, shard_size=64, metadata={"tool": "tadmerge"})
    assert len(shards) > 1
    create_shard_files(str(tmp_path), shards)
    for shard in shards:
        path = str(tmp_path / shard.filename)
        assert os.path.getsize(path) == shard.file_size
        for t in shard.tensors:
            src = tensors[t.name]
            if src.dim() >= 1 and src.shape[0] > 1:  # write in two row blocks
                half = src.shape[0] // 2
                row_bytes = src[0].numel() * src.element_size()
                write_at(path, shard.tensor_offset(t.name), src[:half])
                write_at(path, shard.tensor_offset(t.name) + half * row_bytes, src[half:])
            else:
                write_at(path, shard.tensor_offset(t.name), src)
    sync_all([str(tmp_path / s.filename) for s in shards])
    loaded = {}
    for shard in shards:
        path = str(tmp_path / shard.filename)
        loaded.update(load_file(path))
        with safe_open(path, framework="pt") as f:
            assert f.metadata()["tool"] == "tadmerge" and f.metadata()["format"] == "pt"
    assert set(loaded) == set(tensors)
    for n, t in tensors.items():
        assert loaded[n].dtype == t.dtype and loaded[n].shape == t.shape
        assert torch.equal(loaded[n].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
    index = json.loads(index_json(shards))
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs)
    assert index["weight_map"]["a.weight"] in {s.filename for s in shards}
    assert index_json(shards) == index_json(layout_shards(specs, 64, {"tool": "tadmerge"}))
    assert list(index["weight_map"]) == sorted(tensors)


def test_create_shard_files_is_idempotent(tmp_path) -> None:
    (shard,) = layout_shards(outs({"a": ("F32", (4,))}), 1 << 20)
    assert isinstance(shard, ShardSpec)
    create_shard_files(str(tmp_path), [shard])
    path = str(tmp_path / shard.filename)
    write_at(path, shard.tensor_offset("a"), torch.ones(4))
    create_shard_files(str(tmp_path), [shard])  # resume: data must survive
    assert load_file(path)["a"].tolist() == [1.0] * 4
    os.truncate(path, 10)  # damaged: recreated at full size with zero data
    create_shard_files(str(tmp_path), [shard])
    assert os.path.getsize(path) == shard.file_size
    assert load_file(path)["a"].tolist() == [0.0] * 4


def test_write_at_enospc(tmp_path, monkeypatch) -> None:
    (shard,) = layout_shards(outs({"a": ("F32", (4,))}), 1 << 20)
    create_shard_files(str(tmp_path), [shard])
    path = str(tmp_path / shard.filename)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full_disk)
    with pytest.raises(MergeRuntimeError) as info:
        write_at(path, shard.tensor_offset("a"), torch.ones(4))
    assert path in str(info.value) and "ENOSPC" in str(info.value)
    assert os.strerror(errno.ENOSPC) in str(info.value)


def test_write_at_short_writes_and_bad_dir(tmp_path, monkeypatch) -> None:
    (shard,) = layout_shards(outs({"a": ("I64", (64,))}), 1 << 20)
    create_shard_files(str(tmp_path), [shard])
    path = str(tmp_path / shard.filename)
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, off: real(fd, bytes(data)[:7], off))
    write_at(path, shard.tensor_offset("a"), torch.arange(64))
    monkeypatch.undo()
    assert torch.equal(load_file(path)["a"], torch.arange(64))
    with pytest.raises(MergeRuntimeError) as info:
        write_at(str(tmp_path / "no" / "dir.bin"), 0, torch.ones(1))
    assert "dir.bin" in str(info.value)


def test_sync_all_releases_write_descriptors(tmp_path) -> None:
    (shard,) = layout_shards(outs({"a": ("F32", (2,))}), 1 << 20)
    create_shard_files(str(tmp_path), [shard])
    path = str(tmp_path / shard.filename)
    write_at(path, shard.tensor_offset("a"), torch.ones(2))
    assert block_io._WRITE_FDS.cached_fd(path) is not None
    sync_all([path])
    assert block_io._WRITE_FDS.cached_fd(path) is None
    with pytest.raises(MergeRuntimeError):
        sync_all([str(tmp_path / "missing")])
