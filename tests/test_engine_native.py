"""The C kernels (engine/native.py, engine/native_kernels.c).

The stream kernel must give the bytes of the definition (float32 τ_k, products
before sums in task order, ·λ + θ0 or / Σw, one rounding to the output dtype)
for any length and K, and float64 report norms. Where the library cannot be
built (no compiler, a failing one, TADMERGE_NATIVE=0) merges run the torch
reference, with the same bytes, and the log says so at WARNING.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import fsum_sq

from tadmerge.config import parse_config
from tadmerge.engine import kernels, native
from tadmerge.engine.keys import N_COARSE
from tadmerge.run.driver import run_merge

needs_cc = pytest.mark.skipif(not native.available(), reason="no C compiler")


def _bf16(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _inputs(n: int, k: int, seed: int) -> list[np.ndarray]:
    """bf16 base + k fine-tunes: heavy-tailed moves, unmoved entries, zeros,
    subnormals and entries near bf16's largest, whose sum overflows to Inf."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 0.02
    base[torch.rand(n, generator=g) < 0.05] = 0.0
    base[torch.rand(n, generator=g) < 0.02] = 1e-39
    out = [base]
    huge = torch.rand(n, generator=g) < 0.01
    for j in range(k):
        tau = torch.randn(n, generator=g) * 1e-3 * torch.rand(n, generator=g) ** 4
        m = base + tau
        still = torch.rand(n, generator=g) < 0.2
        m[still] = base[still]
        if j < 2:  # the first two weights are positive: +Inf, never Inf − Inf
            m[huge] = 3.3e38
        out.append(m)
    return [_bf16(x) for x in out]


def _reference(base, tasks, weights, scale, average, out_dtype) -> np.ndarray:
    """The definition in float32 numpy, one operation at a time."""
    f32 = [(x.astype(np.uint32) << 16).view(np.float32) for x in (base, *tasks)]
    with np.errstate(over="ignore", invalid="ignore"):
        acc = None
        for w, t in zip(weights, f32[1:], strict=True):
            term = (t if average else t - f32[0]) * np.float32(w)
            acc = term if acc is None else acc + term
        if average:
            acc = acc / np.float32(sum(weights))
        else:
            acc = acc * np.float32(scale) + f32[0]
    if out_dtype == np.float32:
        return acc
    return _bf16(torch.from_numpy(acc))


@needs_cc
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("out_dtype", [np.uint16, np.float32])
@pytest.mark.parametrize("n,k", [(0, 2), (1, 1), (2047, 3), (2048, 2), (2049, 5), (9001, 4)])
def test_stream_kernel_gives_the_definitions_bytes_and_float64_norms(n, k, out_dtype, average):
    arrays = _inputs(n, k, seed=n + k)
    weights = [1.0, 0.7, -0.25, 2.0, 0.1][:k]
    out = np.empty(n, out_dtype)
    sq, nan = kernels.stream_raw(arrays[0], arrays[1:], weights, 0.3, average, out)
    ref = _reference(arrays[0], arrays[1:], weights, 0.3, average, out_dtype)
    assert not np.isnan(_as_f32(ref, out_dtype)).any()
    if n > 2000 and k > 1 and not average:
        assert np.isinf(_as_f32(ref, out_dtype)).any()  # (the overflow is exercised)
    assert nan == 0
    assert out.tobytes() == ref.tobytes()
    f32 = [(x.astype(np.uint32) << 16).view(np.float32) for x in arrays]
    for j, s in enumerate(sq):
        tau = torch.from_numpy(f32[j + 1] - f32[0])
        assert math.isclose(s, fsum_sq(tau), rel_tol=1e-12)


def _as_f32(ref: np.ndarray, out_dtype) -> np.ndarray:
    if out_dtype == np.float32:
        return ref
    return (ref.astype(np.uint32) << 16).view(np.float32)


@needs_cc
def test_a_nan_result_is_left_to_the_caller():
    base = _bf16(torch.zeros(8))
    up, down = _bf16(torch.full((8,), 3e38)), _bf16(torch.full((8,), -3e38))
    out = np.empty(8, np.uint16)
    # 2·(+3e38) + 2·(−3e38): Inf − Inf
    sq, nan = kernels.stream_raw(base, [up, down], [2.0, 2.0], 1.0, False, out)
    assert nan == 8 and all(math.isfinite(s) for s in sq)


@needs_cc
def test_wrong_arrays_are_refused():
    """A kernel is never handed an array it would read past: kernels.py names
    the dtype, contiguity or length it wants."""
    a = np.zeros(16, np.uint16)
    with pytest.raises(TypeError, match="16 entries of uint16"):
        kernels.stream_raw(a, [a[::2]], [1.0], 1.0, False, a.copy())
    with pytest.raises(TypeError, match="16 entries of uint16"):
        kernels.stream_raw(a, [a[:8].copy()], [1.0], 1.0, False, a.copy())
    with pytest.raises(TypeError, match="float16, float32 or float64, not int64"):
        kernels.stream_raw(a, [a], [1.0], 1.0, False, np.empty(16, np.int64))
    with pytest.raises(TypeError, match="float32"):
        kernels.ties_votes([torch.zeros(4, dtype=torch.float64)], [1.0])
    with pytest.raises(TypeError, match="4 entries of float32"):
        kernels.ties_votes([torch.zeros(4), torch.zeros(3)], [1.0, 1.0])
    with pytest.raises(TypeError, match="bf16 patterns"):
        kernels.coarse_sparse_raw(a, a.astype(np.int16))
    with pytest.raises(TypeError, match="16 entries of uint16"):
        kernels.tie_end_raw(a, a[:4].copy(), 5, 1)


SUMS_OF_A_COPY = """
import numpy as np
from tadmerge.engine import kernels
assert kernels.load()
n = 1 << 20
rng = np.random.default_rng(5)
vs = [rng.standard_normal(n).astype(np.float32) for _ in range(2)]
base = rng.standard_normal((n // 2, 2)).astype(np.float32)
got = []
for b in (base.reshape(-1), base.T.copy().T):  # flat, then Fortran order: flattened by a copy
    lo, hi = np.full(2, 255, np.int32), np.ones(2, np.int32)
    kernels.sums_range(vs, b, [True, True], lo, hi)
    tables = np.zeros((2, 2, 1, 600), np.int64)  # hi, lo: [pairs, segments, bins]
    kernels.sums_accumulate(vs, b, [True, True], [(0, 0), (0, 1)], 0, (n, 1, False), 0, *tables)
    got.append([lo.tolist(), hi.tolist(), tables.tolist()])
assert got[0] == got[1]
try:
    kernels.sums_range(vs, base.reshape(-1), [True], lo, hi)
except TypeError as e:
    assert "2 entries of int8" in str(e), e
else:
    raise AssertionError("a flag short of the vectors was taken")
"""


@needs_cc
def test_the_sums_kernels_read_a_flattened_copy_while_it_lives():
    """A base that is not flat and contiguous is flattened into a copy, which
    must outlive the kernel's read: with its address alone, glibc (told to map
    and unmap such buffers) gave the kernel unmapped memory and the process a
    segfault. The same integers as the contiguous base; a flag per vector."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run(
        [sys.executable, "-c", SUMS_OF_A_COPY], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])


@needs_cc
def test_the_library_is_built_once_per_source(tmp_path, monkeypatch):
    first = native.build(tmp_path)
    assert first.exists() and first.parent == tmp_path

    def no_compiler(*a, **kw):
        raise AssertionError("rebuilt a cached library")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert native.build(tmp_path) == first
    # another source (or compiler, or machine) is another library
    monkeypatch.setattr(native, "FLAGS", (*native.FLAGS, "-DX"))
    assert native.library_path(tmp_path) != first
    assert list(tmp_path.iterdir()) == [first]  # no temporary file left


def test_without_a_working_compiler_there_is_no_library(tmp_path, monkeypatch):
    """No compiler, a failing one, or TADMERGE_NATIVE=0: no library (merges
    then run the torch reference: the test below)."""
    monkeypatch.setenv("TADMERGE_CACHE_DIR", str(tmp_path / "cache"))
    for env in ({"CC": str(tmp_path / "no-such-cc")}, {"CC": "false"}, {"TADMERGE_NATIVE": "0"}):
        monkeypatch.setattr(native, "_state", {})
        with monkeypatch.context() as m:
            for name, value in env.items():
                m.setenv(name, value)
            assert native.kernels() is None, env
            assert not kernels.enabled(None, "auto")
    with monkeypatch.context() as m:
        m.setenv("CC", "false")
        with pytest.raises(native.NativeUnavailable, match="failed"):
            native.build(tmp_path / "other")


SELECTIONS = {
    "none": {"method": "none"},
    "tadrop": {"method": "tadrop", "low_q": 0.5, "high_q": 0.95, "rescale": "l2"},
}


@pytest.mark.parametrize("sname", ["none", "tadrop", "ties", "emr"])
def test_merges_take_the_c_kernels_with_the_bytes_of_the_torch_reference(
    tmp_path, monkeypatch, caplog, sname
):
    """bf16 task arithmetic alone (the stream kernel) or with TADrop (the raw
    kernels), TIES and EMR (float32 blocks): runtime.kernels auto takes the C
    kernels where they build, and writes the bytes of torch (the reference);
    numba (removed) is auto, said at WARNING; without a compiler auto runs the
    torch reference, the same bytes, said once at WARNING, and c is refused."""
    from checkpoints import write_checkpoint

    from tadmerge.errors import ConfigError

    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(300, 70, generator=g), "b": torch.randn(70, generator=g)}
    paths = []
    for k in range(3):
        moved = {n: v + torch.randn(v.shape, generator=g) * 1e-2 * k for n, v in base.items()}
        bf16 = {n: v.bfloat16() for n, v in moved.items()}
        paths.append(write_checkpoint(str(tmp_path / f"m{k}"), bf16))
    used = []
    real = kernels._lib

    def spy():
        used.append("c")
        return real()

    monkeypatch.setattr(kernels, "_lib", spy)
    method, sparsify = {
        "none": ("task_arithmetic", {"method": "none"}),
        "tadrop": ("task_arithmetic", SELECTIONS["tadrop"]),
        "ties": ("ties", {"method": "magnitude", "density": 0.5}),
        "emr": ("emr", {"method": "none"}),
    }[sname]
    w = 0.6 if sname != "emr" else 1.0

    def merge(tag: str, backend: str) -> bytes:
        used.clear()
        caplog.clear()
        cfg = parse_config(
            {
                "base": paths[0],
                # (EMR takes no weights: a weight it ignores would be said at WARNING)
                "models": [{"path": paths[1], "weight": 1.0}, {"path": paths[2], "weight": w}],
                "merge": {"method": method},
                "sparsify": sparsify,
                "output": {"path": str(tmp_path / tag)},
                "runtime": {"kernels": backend, "workers": 2},
            }
        )
        run_merge(cfg)
        out = tmp_path / tag  # the tensors, EMR's masks and rescalers
        names = sorted(f.relative_to(out).as_posix() for f in out.rglob("*") if f.is_file())
        kept = [f for f in names if f.endswith(".safetensors") or f == "emr.json" or "/c/" in f]
        return b"".join(f.encode() + (out / f).read_bytes() for f in kept)

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]

    caplog.set_level("WARNING")
    reference = merge("torch", "torch")
    assert not used and not warnings()
    if native.available():
        assert merge("auto", "auto") == reference and used and not warnings()
        assert merge("c", "c") == reference and used
        assert merge("numba", "numba") == reference and used
        assert any("numba is deprecated" in w for w in warnings())
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("TADMERGE_CACHE_DIR", str(tmp_path / "cache"))
    assert merge("no-compiler", "auto") == reference and not used
    said = warnings()
    assert len(said) == 1 and "the torch reference runs instead, with the same bytes" in said[0]
    assert "false failed on native_kernels.c" in said[0]
    with pytest.raises(ConfigError, match="runtime.kernels: c, but the C kernels are unavailable"):
        merge("refused", "c")
    assert not (tmp_path / "refused").exists()


@needs_cc
def test_an_unwritable_cache_builds_in_a_private_directory(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("TADMERGE_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(native, "_state", {})
    got = native.kernels()
    assert got is not None
    assert blocker.parent not in Path(got._name).parents


@needs_cc
@pytest.mark.parametrize("n", [1, 2, 1023, 1024, 1025, 5001])
def test_the_counting_kernel_counts_and_sets_keys_aside_in_stream_order(n):
    """coarse_side_raw: the coarse counts of τ's keys, zero keys included (the C
    kernel spreads them over spare slots), and the keys with low bits set in
    the order of its two streams, interleaved; -1 when they do not fit `side`."""
    base, task = _inputs(n, 1, seed=n)
    f32 = [(x.astype(np.uint32) << 16).view(np.float32) for x in (base, task)]
    keys = (f32[1] - f32[0]).view(np.uint32) & 0x7FFFFFFF
    h = n // 2
    order = np.stack([keys[:h], keys[h : 2 * h]], axis=1).reshape(-1)
    order = np.concatenate([order, keys[2 * h :]])
    low = order[(order & 0xFFFF) != 0].astype(np.int32)
    if n > 1000:
        assert (keys == 0).any() and low.size  # (the data has both)
    c = native.kernels()
    for cap in sorted({n, low.size, max(0, low.size - 1), 0}):
        slots = N_COARSE + native.ZERO_SLOTS
        counts, counts2 = np.zeros(slots, np.int64), np.zeros(slots, np.int64)
        side = np.full(max(cap, 1), -7, np.int32)
        ns = c.tadmerge_coarse_side_raw(
            base.ctypes.data, task.ctypes.data, n, counts.ctypes.data, counts2.ctypes.data,
            side.ctypes.data, cap,
        )  # fmt: skip
        if cap < low.size:
            assert ns == -1
            continue
        assert ns == low.size and np.array_equal(side[:ns], low)
        total = counts + counts2
        total[0] += total[N_COARSE:].sum()  # the zero keys' spare slots are bucket 0's
        assert np.array_equal(total[:N_COARSE], np.bincount(keys >> 16, minlength=N_COARSE))


def test_the_kernels_command_builds_and_says_what_merges_take(tmp_path, monkeypatch, capsys):
    from tadmerge.cli import main

    monkeypatch.setattr(native, "_state", {})
    assert main(["kernels"]) == 0
    out = capsys.readouterr().out
    if native.available():
        assert "C kernels: ready (" in out and "take: the C kernels on a CPU" in out
    monkeypatch.setenv("TADMERGE_KERNELS", "torch")
    assert main(["kernels"]) == 0
    assert "take: the torch reference (TADMERGE_KERNELS=torch)" in capsys.readouterr().out
    monkeypatch.delenv("TADMERGE_KERNELS")
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("TADMERGE_CACHE_DIR", str(tmp_path))
    assert main(["kernels"]) == 0
    out = capsys.readouterr().out
    assert "C kernels: unavailable: false failed on native_kernels.c: exit status 1" in out
    assert "take: the torch reference (the C kernels are unavailable" in out
    # merge.py, the Ray job's entry point, runs the same command
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, str(root / "merge.py"), "kernels"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "C kernels: unavailable: false failed" in done.stdout


@needs_cc
def test_a_cached_library_that_does_not_load_is_built_again(tmp_path, monkeypatch):
    monkeypatch.setenv("TADMERGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    native.library_path().write_bytes(b"not a library")
    got = native.kernels()
    assert got is not None and Path(got._name) == native.library_path()
    assert native.library_path().read_bytes() != b"not a library"


@needs_cc
@pytest.mark.parametrize("rows,m", [(1, 1), (5, 1), (3, 7), (64, 1000), (1, 70000), (16, 4096)])
@pytest.mark.parametrize("rescale", ["inverse_keep", "none"])
def test_della_rows_kernel_gives_the_bits_of_a_stable_sort_of_each_row(rows, m, rescale):
    """DELLA's C pass (ranks by a radix sort) against the definition written out
    here: rank = position in a stable ascending sort of the row's |τ| keys, then
    p = lo + c·rank/(m − 1) in float64, kept where u < p, scaled by fl32(1/p)."""
    from types import SimpleNamespace

    from tadmerge.methods import della

    g = torch.Generator().manual_seed(rows * 7919 + m)
    tau = torch.randn(rows * m, generator=g) * 1e-3
    tau[torch.rand(rows * m, generator=g) < 0.1] = 0.0
    tau[torch.rand(rows * m, generator=g) < 0.05] = -0.0
    tau[torch.rand(rows * m, generator=g) < 0.1] = 2e-4  # runs of equal keys
    tau[torch.rand(rows * m, generator=g) < 0.1] = -2e-4
    u = torch.rand(rows * m, generator=g)
    density, epsilon = 0.4, 0.15
    keys = (tau.view(torch.int32) & 0x7FFFFFFF).view(rows, m).tolist()
    want, kept = [], 0
    for r in range(rows):
        order = sorted(range(m), key=lambda j: (keys[r][j], j))
        rank = [0] * m
        for pos, j in enumerate(order):
            rank[j] = pos
        for j in range(m):
            i = r * m + j
            p = (density - epsilon) + (2.0 * epsilon * rank[j]) / (m - 1) if m > 1 else density
            keep = float(u[i]) < p
            kept += keep
            v = tau[i]
            if rescale == "inverse_keep":
                v = v * torch.tensor(1.0 / max(p, 1e-300), dtype=torch.float32)
            want.append(float(v) if keep else 0.0)
    spec = SimpleNamespace(density=density, epsilon=epsilon, rescale=rescale)
    got, got_kept = della.block(tau.clone(), u, spec, m, backend="c")
    ref, ref_kept = della.block(tau.clone(), u, spec, m, backend="torch")
    want_t = torch.tensor(want, dtype=torch.float32)
    assert got_kept == ref_kept == kept
    assert torch.equal(got.view(torch.int32), want_t.view(torch.int32))
    assert torch.equal(ref.view(torch.int32), want_t.view(torch.int32))


@needs_cc
@pytest.mark.parametrize("n", [1, 13, 1000, 70001])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("lambdas", ["none", "some", "all"])
def test_ram_kernel_gives_the_bits_of_the_torch_reference(n, k, lambdas):
    """RAM / RAMPlus in one C pass (kernels.ram_merge) against ram_delta + θ0 in
    torch: entries at and around epsilon, signed zeros, Inf and NaN, tasks moved
    alone (RAMPlus' λ) and together."""
    from tadmerge.methods import ram

    g = torch.Generator().manual_seed(n * 31 + k)
    eps = 1e-5
    base = torch.randn(n, generator=g) * 0.02
    ts = [torch.randn(n, generator=g) * 2e-5 for _ in range(k)]
    for j, t in enumerate(ts):
        t[torch.rand(n, generator=g) < 0.2] = 0.0
        t[torch.rand(n, generator=g) < 0.1] = -0.0
        t[torch.rand(n, generator=g) < 0.1] = eps * (1 if j % 2 else -1)
    if n >= 13:
        ts[0][3], ts[-1][12] = math.inf, math.nan
    lam = {"none": None, "some": [1.0] + [1.07] * (k - 1), "all": [1.13] * k}[lambdas]
    want = ram.ram_delta([t.clone() for t in ts], eps, lam).add_(base)
    got = kernels.ram_merge([t.clone() for t in ts], base, eps, lam)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@needs_cc
@pytest.mark.parametrize("n", [1, 255, 256, 257, 70001])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_ram_counts_kernel_counts_as_the_definition(n, k):
    """RAMPlus' counts in one C pass (kernels.ram_counts) and in torch
    (moved_counts' reference, chunk by chunk) against the definition written
    out per entry: moved where |t_k| > ε (not at ε, not NaN), shared where
    another task moved too, unique where none did."""
    from tadmerge.methods import ram

    g = torch.Generator().manual_seed(n * 7 + k)
    eps = 1e-5
    ts = [torch.randn(n, generator=g) * 2e-5 for _ in range(k)]
    for j, t in enumerate(ts):
        t[torch.rand(n, generator=g) < 0.3] = 0.0
        t[torch.rand(n, generator=g) < 0.1] = eps * (1 if j % 2 else -1)
    if n >= 255:
        ts[0][3], ts[-1][12], ts[0][254] = math.inf, math.nan, -math.inf
    moved = [[abs(x) > eps for x in t.tolist()] for t in ts]  # (NaN > ε is False)
    shared, unique = [0] * k, [0] * k
    for i in range(n):
        c = sum(m[i] for m in moved)
        for j in range(k):
            if moved[j][i]:
                (shared if c > 1 else unique)[j] += 1
    want = shared + unique
    assert kernels.ram_counts(ts, eps).tolist() == want
    assert ram.moved_counts(ts, eps, "torch").tolist() == want
    assert ram.moved_counts(ts, eps, "c").tolist() == want


@needs_cc
@pytest.mark.parametrize("n", [1, 1000, 70001])
def test_signed_histograms_kernels_count_as_the_torch_reference(n):
    """A signed score's order-key histograms (engine/signed.py: arcee_fusion's
    importance) in one C pass each against the torch reference, and the
    coarse counts against keys written out per value: negatives, ±0, ±Inf,
    NaN, subnormals; fine rows of wanted buckets, empty ones included."""
    from tadmerge.engine import signed

    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.exp(3 * torch.randn(n, generator=g))
    x[torch.rand(n, generator=g) < 0.1] = 0.0
    x[torch.rand(n, generator=g) < 0.1] = -0.0
    if n >= 1000:
        x[:6] = torch.tensor([math.inf, -math.inf, math.nan, 1e-42, -1e-42, 2.5])
    ref = signed.signed_coarse(x, "torch").counts
    got = signed.signed_coarse(x, "c").counts
    assert np.array_equal(got, ref)

    def key(v: float) -> int:
        bits = int(np.float32(v).view(np.uint32))
        mag = bits & 0x7FFFFFFF
        return 0x7FFFFFFF - mag if bits >> 31 and mag else 0x80000000 + mag

    want = np.bincount([key(v) >> 16 for v in x.tolist()], minlength=1 << 16)
    assert np.array_equal(got, want)
    buckets = sorted({key(float(x[i])) >> 16 for i in range(0, n, max(1, n // 5))} | {0, 12345})
    ref_f = signed.signed_fine(x, buckets, "torch")
    got_f = signed.signed_fine(x, buckets, "c")
    assert ref_f.keys() == got_f.keys() == set(buckets)
    for b in buckets:
        assert np.array_equal(ref_f[b].bins, got_f[b].bins), b
        assert np.array_equal(ref_f[b].counts, got_f[b].counts), b


@needs_cc
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 70001])
def test_square_sum_is_a_float64_sum_on_either_backend(n):
    """The report's Σx² (engine/block.py square_sum, SPEC: norms in float64) from
    the C pass and from torch's chunked float64 norms, against math.fsum of the
    squares: beyond float32's range, subnormals, and NaN/Inf made non-finite."""
    from tadmerge.engine.block import square_sum

    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.exp(10 * torch.randn(n, generator=g)).clamp(max=1e30)
    if n > 8:
        x[:3] = torch.tensor([3e38, -2e38, 1e-42])  # squares beyond float32's range
    want = math.fsum(v * v for v in x.double().tolist())
    for backend in ("c", "torch"):
        assert square_sum(x, backend) == pytest.approx(want, rel=1e-12, abs=0.0), backend
    if n:
        bad = x.clone()
        bad[n // 2] = math.nan
        assert not math.isfinite(square_sum(bad, "c")) and not math.isfinite(
            square_sum(bad, "torch")
        )
        bad[n // 2] = -math.inf
        assert square_sum(bad, "c") == square_sum(bad, "torch") == math.inf
