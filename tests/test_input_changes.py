"""Never publish wrong bytes: inputs that change, transient read errors, overflow.

Each test injects its fault from here (monkeypatching the executor's unit call,
os.preadv or os.open, or the progress callback), runs the real CLI in-process
and checks the contract (README "Exit codes and guarantees"):

- an input that changes during a merge (rewritten in place; atomically
  replaced, even by the same values under a longer header; rewritten with its
  size and mtime kept, as cp -p / rsync -t / utime leave it): exit 3 naming the
  file, nothing published, the staging removed (it can never be resumed); a
  rerun gives the bytes of an uninterrupted merge of the final inputs;
- the same change between a kill and `--resume`: refused (exit 2) naming the
  file and what changed, the staging kept as it was;
- a brief EACCES on an input mid-merge: exit 4 naming the file and the errno,
  the staging and its finished units kept; `--resume` finishes with the bytes of
  an uninterrupted merge;
- NaN/Inf that the merge makes from finite inputs (an overflow of the output
  dtype) on each path that writes merged bytes (streamed, raw bf16, torch
  engine): exit 3 naming the output tensor, nothing published, unless
  inputs.allow_nonfinite.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import struct
from pathlib import Path

import killpoints
import pytest
import torch
import yaml
from checkpoints import SPLIT_RUNTIME, write_checkpoint
from outputs import model_files, run_cli
from safetensors.torch import save_file

import tadmerge.cluster.local as local
from tadmerge.cli import main
from tadmerge.errors import EXIT_CONFIG, EXIT_INPUT, EXIT_OK, EXIT_RUNTIME
from tadmerge.io import block_io

RUNTIME = {
    **SPLIT_RUNTIME,
    "workers": 1,  # the units in order, so that a fault lands between two of them
}


def base_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "a.weight": torch.randn(64, 8, generator=g),  # 2 units
        "b.weight": torch.randn(64, 8, generator=g).bfloat16(),  # 2 units
        "c.bias": torch.randn(4, generator=g),
        "d.weight": torch.randn(16, 8, generator=g).bfloat16(),  # 1 unit (the raw bf16 path)
        "ids": torch.arange(5),
    }


def finetune(base: dict[str, torch.Tensor], i: int, size: float = 0.05) -> dict:
    g = torch.Generator().manual_seed(100 + i)
    out = {}
    for n, v in base.items():
        if v.is_floating_point():
            out[n] = (v.float() + size * (i + 1) * torch.randn(v.shape, generator=g)).to(v.dtype)
        else:
            out[n] = v.clone()
    return out


class World:
    def __init__(self, tmp: Path, size: float = 0.05, **cfg):
        self.tmp = tmp
        base = base_tensors()
        self.base = write_checkpoint(str(tmp / "in" / "base"), base)
        self.models = [
            write_checkpoint(str(tmp / "in" / f"m{i}"), finetune(base, i, size)) for i in range(2)
        ]
        self.cfg = {
            "base": self.base,
            "models": [{"path": p, "name": f"m{i}"} for i, p in enumerate(self.models)],
            "merge": {"method": "task_arithmetic", "scale": 0.7},
            "output": {"path": str(tmp / "out")},
            "runtime": dict(RUNTIME),
            **cfg,
        }

    @property
    def out(self) -> Path:
        return Path(self.cfg["output"]["path"])

    @property
    def staging(self) -> Path:
        return self.out.parent / f".{self.out.name}.tadmerge-staging"

    def model_file(self, i: int = 1) -> str:
        return os.path.join(self.models[i], "model.safetensors")

    def write_cfg(self, out: Path | None = None, name: str = "merge.yaml") -> str:
        cfg = dict(self.cfg, output={**self.cfg["output"], "path": str(out or self.out)})
        path = self.tmp / name
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return str(path)

    def reference(self, name: str) -> dict[str, bytes]:
        """The bytes of an uninterrupted merge of the inputs as they are now."""
        out = self.tmp / name
        assert main(["-q", "merge", self.write_cfg(out, f"{name}.yaml")]) == EXIT_OK
        assert main(["-q", "verify", str(out)]) == EXIT_OK
        return model_files(out)


def one_error(rc: int, lines: list[str], code: int, needles: list[str]) -> str:
    text = "\n".join(lines)
    assert rc == code, f"exit {rc}, expected {code}:\n{text}"
    assert len(lines) == 1 and lines[0].startswith("tadmerge: error: "), text
    assert "internal error" not in text and "Traceback" not in text, text
    for needle in needles:
        assert needle in text, f"{needle!r} not in:\n{text}"
    return text


def units_logged(w: World) -> int:
    return len((w.staging / ".tadmerge" / "units.jsonl").read_text().splitlines())


# ------------------------------------------------------------------------------------
# the ways an input changes
# ------------------------------------------------------------------------------------


def _data_start(path: str) -> int:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


def _wait_for_ctime(path: str, before: int) -> None:
    """Each utime moves ctime; the kernel's coarse clock may not have ticked yet."""
    st = os.stat(path)
    while os.stat(path).st_ctime_ns == before:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def rewrite_in_place(path: str, values: dict) -> None:
    """Other values written over the data of the same file (same header, same size)."""
    tmp = path + ".new"
    save_file({n: v.contiguous() for n, v in values.items()}, tmp)
    new = Path(tmp).read_bytes()
    os.remove(tmp)
    start = _data_start(path)
    assert 8 + struct.unpack("<Q", new[:8])[0] == start and len(new) == os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(new[start:])


def copy_keeping_size_and_mtime(path: str, values: dict) -> None:
    """cp -p / rsync -t: other bytes, same size, the old mtime restored."""
    st = os.stat(path)
    rewrite_in_place(path, values)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    _wait_for_ctime(path, st.st_ctime_ns)
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        st.st_size,
        st.st_mtime_ns,
        st.st_ino,
    )


def replace_atomically_same_values(path: str, values: dict) -> None:
    """The same values republished under a longer header: every offset moves."""
    before = _data_start(path)
    tmp = path + ".tmp"
    save_file(
        {n: v.contiguous() for n, v in values.items()}, tmp, metadata={"republished": "x" * 40}
    )
    os.replace(tmp, path)
    assert _data_start(path) > before


CHANGES = {
    "in_place": lambda path, base: rewrite_in_place(path, finetune(base, 7)),
    "cp_p": lambda path, base: copy_keeping_size_and_mtime(path, finetune(base, 7)),
    "atomic_longer_header": lambda path, base: replace_atomically_same_values(
        path, finetune(base, 1)
    ),
}
WHY = {
    "in_place": "modified (mtime",
    "cp_p": "ctime moved",
    "atomic_longer_header": "replaced",  # (through the open descriptor: it lost its name)
}


def after_units(monkeypatch, n: int | None, action) -> dict:
    """Run `action` once the executor has finished `n` units (None: the last one)."""
    real = local.run_unit
    seen = {"n": 0, "done": False}

    def run_unit(plan, *args):
        rec = real(plan, *args)
        seen["n"] += 1
        last = n is None and seen["n"] == len(plan.units)
        if not seen["done"] and (seen["n"] == n or last):
            seen["done"] = True
            action()
        return rec

    monkeypatch.setattr(local, "run_unit", run_unit)
    return seen


# ------------------------------------------------------------------------------------
# 1. an input that changes during a merge
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("when", [2, None], ids=["mid_merge", "after_the_last_read"])
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_input_changed_during_the_merge(tmp_path, capsys, monkeypatch, change, when):
    w = World(tmp_path)
    f = w.model_file(1)
    seen = after_units(monkeypatch, when, lambda: CHANGES[change](f, base_tensors()))
    rc, lines = run_cli(capsys, "merge", w.write_cfg())
    assert seen["done"]
    text = one_error(rc, lines, EXIT_INPUT, [f, "changed during the merge", "rerun"])
    assert WHY[change] in text, text
    assert not w.out.exists(), "published"
    assert not w.staging.exists(), "staging kept, though it can never be resumed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "merge.yaml"]

    # a rerun merges the inputs as they are now, with the bytes of an uninterrupted merge
    monkeypatch.undo()
    rc, lines = run_cli(capsys, "merge", w.write_cfg())
    assert rc == EXIT_OK, lines
    assert main(["-q", "verify", str(w.out)]) == EXIT_OK
    assert model_files(w.out) == w.reference("ref")


def test_input_changed_during_the_statistics_stage(tmp_path, capsys, monkeypatch):
    """TIES reads every split tensor twice (a statistics round, then the merge):
    both reads must be of one version."""
    w = World(tmp_path)
    w.cfg["merge"] = {"method": "ties", "scale": 0.7}
    w.cfg["sparsify"] = {"method": "magnitude", "density": 0.5}
    f = w.model_file(0)
    real = local.unit_stats
    seen = {"n": 0}

    def unit_stats(*args):
        seen["n"] += 1
        if seen["n"] == 1:
            CHANGES["cp_p"](f, base_tensors())
        return real(*args)

    monkeypatch.setattr(local, "unit_stats", unit_stats)
    rc, lines = run_cli(capsys, "merge", w.write_cfg())
    assert seen["n"] >= 1
    one_error(rc, lines, EXIT_INPUT, [f, "changed during the merge", "ctime moved"])
    assert not w.out.exists() and not w.staging.exists()


def test_every_changed_input_is_named(tmp_path, capsys, monkeypatch):
    w = World(tmp_path)
    files = [w.model_file(0), w.model_file(1)]

    def change_both():
        for f in files:
            CHANGES["cp_p"](f, base_tensors())

    after_units(monkeypatch, None, change_both)
    rc, lines = run_cli(capsys, "merge", w.write_cfg())
    assert rc == EXIT_INPUT
    assert lines[0] == "tadmerge: error: 2 input problem(s):", lines
    assert [ln.split(": changed during the merge")[0] for ln in lines[1:]] == [
        f"  {f}" for f in files
    ]
    assert not w.out.exists() and not w.staging.exists()


# ------------------------------------------------------------------------------------
# ... and between a kill and --resume
# ------------------------------------------------------------------------------------


def interrupted_after(monkeypatch, capsys, w: World, n: int) -> None:
    """A merge stopped (Ctrl-C) after n units: exit 130, staging kept."""
    killpoints.install(f"progress:{n}", killpoints.interrupt, monkeypatch.setattr)
    rc, _ = run_cli(capsys, "merge", w.write_cfg())
    monkeypatch.undo()
    assert rc == 130
    assert w.staging.is_dir() and not w.out.exists()
    assert units_logged(w) == n
    assert (w.staging / ".tadmerge" / "inputs.json").is_file()


def resume_state(w: World) -> list[tuple[str, bytes]]:
    """The staging's resume state, file by file. The lock file is left out: every
    run that takes the lock writes its holder (pid, host, start time to the
    second) into it, a refused --resume too, so its bytes say when, not what."""
    state = w.staging / ".tadmerge"
    return sorted((p.name, p.read_bytes()) for p in state.iterdir() if p.name != "lock")


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_input_changed_between_a_kill_and_resume(tmp_path, capsys, monkeypatch, change):
    w = World(tmp_path)
    f = w.model_file(1)
    interrupted_after(monkeypatch, capsys, w, 3)
    CHANGES[change](f, base_tensors())
    state = resume_state(w)

    rc, lines = run_cli(capsys, "merge", w.write_cfg(), "--resume")
    text = one_error(rc, lines, EXIT_CONFIG, ["--resume: ", "changed since the interrupted merge"])
    why = {
        "in_place": "modified: mtime changed",
        "cp_p": "rewritten in place or its metadata changed: ctime moved",
        "atomic_longer_header": "replaced by another file",
    }[change]
    assert f"{f} ({why}" in text, text
    assert w.model_file(0) not in text and w.base not in text, text
    assert str(w.staging) in text and "remove the staging directory" in text
    # refused before anything was touched
    assert not w.out.exists()
    assert resume_state(w) == state

    # the user removes the staging and reruns: the bytes of the final inputs' merge
    shutil.rmtree(w.staging)
    rc, lines = run_cli(capsys, "merge", w.write_cfg())
    assert rc == EXIT_OK, lines
    assert main(["-q", "verify", str(w.out)]) == EXIT_OK
    assert model_files(w.out) == w.reference("ref")


def test_resume_with_unchanged_inputs_reuses_the_work(tmp_path, capsys, monkeypatch):
    w = World(tmp_path)
    interrupted_after(monkeypatch, capsys, w, 3)
    rc, lines = run_cli(capsys, "merge", w.write_cfg(), "--resume")
    assert rc == EXIT_OK, lines
    assert model_files(w.out) == w.reference("ref")


# ------------------------------------------------------------------------------------
# 6. transient read errors keep the finished work
# ------------------------------------------------------------------------------------


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


@pytest.mark.parametrize("where", ["preadv", "open"])
def test_transient_eacces_keeps_the_staging_for_resume(tmp_path, capsys, monkeypatch, where):
    w = World(tmp_path)
    f = w.model_file(1)
    real_preadv, real_open = os.preadv, os.open
    armed = {"on": False, "hit": 0}

    def preadv(fd, buffers, offset, *rest):
        if armed["on"] and _fd_path(fd) == f:
            armed["on"] = False
            armed["hit"] += 1
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_preadv(fd, buffers, offset, *rest)

    def open_(path, flags, *rest, **kw):
        if armed["on"] and os.fspath(path) == f:
            armed["on"] = False
            armed["hit"] += 1
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_open(path, flags, *rest, **kw)

    def arm():
        block_io.close_all()  # (as an evicted descriptor: the next read opens the file)
        armed["on"] = True

    monkeypatch.setattr(
        os, "preadv" if where == "preadv" else "open", preadv if where == "preadv" else open_
    )
    after_units(monkeypatch, 3, arm)
    rc, lines = run_cli(capsys, "merge", w.write_cfg())
    monkeypatch.undo()
    assert armed["hit"] == 1
    one_error(
        rc, lines, EXIT_RUNTIME, [f"reading {f} [", "(EACCES)", "is kept", "rerun with --resume"]
    )
    assert not w.out.exists()
    assert w.staging.is_dir() and units_logged(w) == 3, "finished work deleted"

    rc, lines = run_cli(capsys, "merge", w.write_cfg(), "--resume")
    assert rc == EXIT_OK, lines
    assert main(["-q", "verify", str(w.out)]) == EXIT_OK
    assert model_files(w.out) == w.reference("ref")


# ------------------------------------------------------------------------------------
# 7. NaN/Inf made by the merge from finite inputs
# ------------------------------------------------------------------------------------

# each path that writes merged bytes, with a config that overflows its output dtype
OVERFLOWS = {
    # engine/stream.py: the bf16 result of a huge scale
    "stream": ({"merge": {"method": "task_arithmetic", "scale": 1e37}}, "merge_raw"),
    # engine/stream.py: float32 inputs merged into a narrower float16 output
    "stream_f16_out": (
        {"merge": {"method": "task_arithmetic", "scale": 1e3}, "output": {"dtype": "float16"}},
        "merge_raw",
    ),
    # engine/raw.py: bf16 blocks with a magnitude selection (float32 tensors: torch)
    "raw": (
        {
            "merge": {"method": "task_arithmetic", "scale": 1e37},
            "sparsify": {"method": "magnitude", "density": 0.5},
        },
        "merge_raw_sparse",
    ),
    # the torch engine (engine/block.py)
    "torch": ({"merge": {"method": "ties", "scale": 1e37}}, "merge_block"),
}


@pytest.mark.parametrize("path", sorted(OVERFLOWS))
def test_overflow_of_the_output_dtype_is_refused(tmp_path, capsys, monkeypatch, path):
    import tadmerge.cluster.engine_units as engine_units
    import tadmerge.cluster.worker as worker

    extra, fn = OVERFLOWS[path]
    w = World(tmp_path, size=100.0)  # finite inputs, task vectors ~100
    w.cfg.update({k: v for k, v in extra.items() if k != "output"})
    if "output" in extra:
        w.cfg["output"] = {**w.cfg["output"], **extra["output"]}
    module = engine_units if fn == "merge_block" else worker
    real = getattr(module, fn)
    calls = []
    monkeypatch.setattr(module, fn, lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])

    rc, lines = run_cli(capsys, "merge", w.write_cfg())
    if not calls:
        pytest.skip(f"{fn} is not taken here (no compiled kernels)")
    text = "\n".join(lines)
    assert rc == EXIT_INPUT, text
    assert "internal error" not in text and "Traceback" not in text, text
    shard = os.path.join(str(w.out), "model.safetensors")
    assert f"{shard} [b.weight]: " in text or f"{shard} [a.weight]: " in text, text
    assert re.search(r"\d+ NaN/Inf value\(s\) in the merged (BF16|F16|F32) output", text), text
    assert "overflow" in text and "merge.scale" in text and "allow_nonfinite" in text, text
    assert w.model_file(0) not in text, "a finite input blamed"
    assert not w.out.exists() and not w.staging.exists()

    # with the opt-in, the output is published as merged (Inf included)
    w.cfg["inputs"] = {"allow_nonfinite": True}
    rc, lines = run_cli(capsys, "merge", w.write_cfg())
    assert rc == EXIT_OK, lines
    assert main(["-q", "verify", str(w.out)]) == EXIT_OK


def test_finite_output_check_counts_every_dtype():
    from tadmerge.cluster.worker import nonfinite_out

    special = torch.tensor([float("nan"), float("inf"), float("-inf"), 1.0, -2.0, 0.0])
    for name, dtype in [
        ("BF16", torch.bfloat16),
        ("F16", torch.float16),
        ("F32", torch.float32),
        ("F64", torch.float64),
    ]:
        x = torch.randn(300_000, dtype=dtype)
        assert nonfinite_out(x, name) == 0
        assert (
            nonfinite_out(x.view(torch.int16).numpy() if x.itemsize == 2 else x.numpy(), name) == 0
        )
        y = torch.cat([x, special.to(dtype), x])
        assert nonfinite_out(y, name) == 3, name
        big = (torch.randn(300_000, dtype=torch.float64) * 1e5).to(dtype)
        assert nonfinite_out(big, name) == int((~torch.isfinite(big)).sum()), name


# ------------------------------------------------------------------------------------
# the identities travel with the plan; Hub inputs resume by revision
# ------------------------------------------------------------------------------------


def test_the_plan_carries_every_input_version_to_the_workers(tmp_path):
    """Ray actors get the plan pickled: each entry keeps the version its offsets are of."""
    import pickle

    from tadmerge.config import load_config
    from tadmerge.planners.plan import make_plan

    w = World(tmp_path)
    plan = make_plan(load_config(w.write_cfg()))
    f = w.model_file(1)
    st = os.stat(f)
    ident = plan.identities[f]
    assert (ident.ino, ident.size, ident.mtime_ns, ident.ctime_ns) == (
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
    )
    again = pickle.loads(pickle.dumps(plan))
    for tp in again.tensors:
        for e in tp.sources:
            assert e.identity == plan.identities[e.file]


def test_hub_inputs_are_compared_by_revision(tmp_path):
    import dataclasses

    from tadmerge.config import load_config
    from tadmerge.planners.plan import input_versions, make_plan

    w = World(tmp_path)
    plan = make_plan(load_config(w.write_cfg()))
    ck = plan.inputs[1]
    plan.inputs[1] = dataclasses.replace(ck, source="org/m0", revision="0" * 40)
    versions = input_versions(plan)
    key = f"org/m0@{'0' * 40}/model.safetensors"
    ident = plan.identities[ck.files[0]]
    assert versions[key] == {"size": ident.size, "header_sha256": ident.header_sha256}
    assert versions[w.model_file(1)]["ctime_ns"] == plan.identities[w.model_file(1)].ctime_ns


def test_input_changed_during_a_ray_merge(ray_session, tmp_path, capsys, monkeypatch):
    """Ray actors read through descriptors checked against the plan's identities
    (which travel with it): a file rewritten with its size and mtime kept while
    they run fails the merge naming it, as on local threads."""
    w = World(tmp_path)
    w.cfg["runtime"] = {**RUNTIME, "executor": "ray", "workers": 2, "cpus_per_worker": 1}
    f = w.model_file(1)
    seen = {"n": 0}

    def change() -> None:
        seen["n"] += 1
        CHANGES["cp_p"](f, base_tensors())

    killpoints.install("progress:2", change, monkeypatch.setattr)
    rc, lines = run_cli(capsys, "merge", w.write_cfg())
    assert seen["n"] == 1
    one_error(rc, lines, EXIT_INPUT, [f, "changed during the merge", "ctime moved"])
    assert not w.out.exists() and not w.staging.exists()
