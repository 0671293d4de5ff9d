"""A catalogue of bad inputs, run through the real CLI as a nightly job runs it.

Every case builds its broken checkpoints or config under tmp_path, runs
`tadmerge merge` (and `tadmerge plan`) in-process and checks the contract of the
README ("Exit codes and guarantees"):

- the exit code is the documented one (2 config/output path, 3 input, 4 runtime);
- stderr is one line `tadmerge: error: ...` naming the file (and the tensor) and the
  problem; several input problems are one line each under a `N input problem(s):` head;
- nothing is published, and a failure found from the headers alone writes nothing at
  all (every file and directory under tmp_path is unchanged: no staging either);
- no case is an unhandled exception ("internal error") or a hang.

The header parser itself is unit-tested and fuzzed in test_io_header.py; here the
fuzzing goes through the whole merge: random bytes of a valid checkpoint's header
region must be refused before anything is written, random bytes of its data region
must give a verified output or a clean error.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from checkpoints import write_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from outputs import run_cli
from safetensors.torch import save_file

from tadmerge.cli import main
from tadmerge.errors import EXIT_CONFIG, EXIT_INPUT, EXIT_OK

RUNTIME = {
    "block_elements": 64,
    "max_unit_elements": 256,
    "memory_budget": "256MB",
    "progress": "none",
    "device": "cpu",
}


class _Hang(BaseException):
    """Raised by SIGALRM: a case that does not finish is a hang, not a slow test."""


@pytest.fixture(autouse=True)
def no_hang():
    def on_alarm(signum, frame):
        raise _Hang("the case did not finish within 90 s (hang)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(90)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------------------
# building inputs
# ------------------------------------------------------------------------------------


def base_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "a.weight": torch.randn(64, 8, generator=g),  # 2 units with RUNTIME
        "b.weight": torch.randn(6, generator=g).bfloat16(),
        "c.bias": torch.randn(4, generator=g),
        "ids": torch.arange(5),  # non-float buffer: copied, checked identical
    }


def finetune(base: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    out = {}
    for n, v in base.items():
        if v.is_floating_point():
            out[n] = (v.float() + 0.05 * (i + 1) * torch.randn(v.shape, generator=g)).to(v.dtype)
        else:
            out[n] = v.clone()
    return out


@dataclass
class World:
    tmp: Path
    base: str
    models: list[str]
    cfg: dict = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return Path(self.cfg["output"]["path"])

    @property
    def staging(self) -> Path:
        return self.out.parent / f".{self.out.name}.tadmerge-staging"

    def model_file(self, i: int) -> str:
        return os.path.join(self.models[i], "model.safetensors")

    def write_cfg(self, name: str = "merge.yaml") -> str:
        path = self.tmp / name
        path.write_text(yaml.safe_dump(self.cfg, sort_keys=False))
        return str(path)


def make_world(tmp: Path, k: int = 2, base_shards: int = 1) -> World:
    base = base_tensors()
    bp = write_checkpoint(str(tmp / "in" / "base"), base, shards=base_shards)
    mps = [write_checkpoint(str(tmp / "in" / f"m{i}"), finetune(base, i)) for i in range(k)]
    cfg = {
        "base": bp,
        "models": [{"path": p, "name": f"m{i}"} for i, p in enumerate(mps)],
        "merge": {"method": "task_arithmetic", "scale": 0.7},
        "output": {"path": str(tmp / "out")},
        "runtime": dict(RUNTIME),
    }
    return World(tmp, bp, mps, cfg)


def read_st(path: str) -> tuple[dict, bytes]:
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_st(path: str, header: dict | bytes, data: bytes, prefix: int | None = None) -> None:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    n = len(body) if prefix is None else prefix
    Path(path).write_bytes(struct.pack("<Q", n) + body + data)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root with its kind, size and mtime: 'wrote nothing' = equal."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st_ = os.lstat(p)
            out[os.path.relpath(p, root)] = (st_.st_mode, st_.st_size, st_.st_mtime_ns)
    return out


# ------------------------------------------------------------------------------------
# running the CLI and checking the contract
# ------------------------------------------------------------------------------------


def check_error(rc: int, lines: list[str], code: int, needles: list[str]) -> str:
    """The documented exit code and one clear line per problem; returns the text."""
    text = "\n".join(lines)
    assert rc == code, f"exit {rc}, expected {code}:\n{text}"
    assert lines, "no error message on stderr"
    assert lines[0].startswith("tadmerge: error: "), text
    assert "internal error" not in text and "Traceback" not in text, text
    head = re.match(r"tadmerge: error: (\d+) input problem\(s\):$", lines[0])
    if head:  # several input problems: one indented line each, each naming a file
        assert int(head.group(1)) == len(lines) - 1, text
        for ln in lines[1:]:
            assert ln.startswith("  /"), text
            assert re.match(r"  /\S+( \[[^\]]+\])?: \S", ln), text
    else:
        assert len(lines) == 1, f"expected one line:\n{text}"
    for needle in needles:
        assert needle in text, f"{needle!r} not in:\n{text}"
    return text


def assert_nothing_written(w: World, before: dict) -> None:
    out = str(w.out.relative_to(w.tmp))
    assert w.out.exists() == (out in before), "output published"
    assert not w.staging.exists(), "staging directory left by a failure found from headers"
    assert snapshot(w.tmp) == before, "files changed by a failed merge"


def assert_not_published(w: World) -> None:
    assert not w.out.exists(), "output published"
    for p in w.out.parent.iterdir():  # no sibling that looks like an output either
        assert p == w.staging or not p.name.startswith((w.out.name, f".{w.out.name}.")), p
    if w.staging.exists():
        assert not (w.staging / "manifest.json").exists()


def run_bad(capsys, w: World, code: int, needles: list[str], *extra: str) -> str:
    """merge and plan both refuse with the same code, writing nothing at all."""
    cfg = w.write_cfg()
    before = snapshot(w.tmp)
    rc, lines = run_cli(capsys, "merge", cfg, *extra)
    text = check_error(rc, lines, code, needles)
    assert_nothing_written(w, before)
    rc, lines = run_cli(capsys, "plan", cfg, *extra)
    assert check_error(rc, lines, code, needles) == text
    assert_nothing_written(w, before)
    return text


def model_bytes(out: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(out.iterdir())
        if p.name.endswith(".safetensors") or p.name.endswith(".index.json")
    }


# ------------------------------------------------------------------------------------
# plan-time input problems (exit 3, nothing written)
# ------------------------------------------------------------------------------------


def test_all_disagreements_reported_at_once(tmp_path, capsys):
    """Missing, extra, shape and dtype problems of four models, all in one run."""
    w = make_world(tmp_path, k=4)
    base = base_tensors()
    m0 = finetune(base, 0)
    del m0["b.weight"]
    write_checkpoint(w.models[0], m0)
    m1 = finetune(base, 1)
    m1["extra.weight"] = torch.zeros(3)
    write_checkpoint(w.models[1], m1)
    m2 = finetune(base, 2)
    m2["a.weight"] = m2["a.weight"].reshape(8, 64).contiguous()
    write_checkpoint(w.models[2], m2)
    m3 = finetune(base, 3)
    m3["ids"] = m3["ids"].int()  # (a float one in another float dtype merges)
    write_checkpoint(w.models[3], m3)
    text = run_bad(
        capsys,
        w,
        EXIT_INPUT,
        [
            "4 input problem(s):",
            f"{w.model_file(0)} [b.weight]: missing in model 'm0'",
            f"{w.model_file(1)} [extra.weight]: not in the base",
            f"{w.model_file(2)}: 1 tensor differs in shape (model 'm2' vs the base), "
            "e.g. a.weight [8, 64] vs [64, 8]: the model is not a fine-tune of this base",
            f"{w.model_file(3)}: 1 tensor differs in dtype (I32 in model 'm3' vs I64 in the "
            "base), e.g. ids: convert the model to I64",
        ],
    )
    assert text.count("\n") == 4


def test_non_float_dtype_mismatch_is_one_line_that_says_what_to_do(tmp_path, capsys):
    """Every integer buffer of m0 saved in int32 over an int64 base: one problem, not
    one per tensor, naming both dtypes, a few tensors and the fix. (A float tensor in
    another float dtype merges: tests/test_real_checkpoints.py.)"""
    w = make_world(tmp_path, k=2)
    base = {f"layers.{i}.ids": torch.arange(4) for i in range(6)}
    base["w"] = torch.randn(4, 4)
    write_checkpoint(w.base, base)
    write_checkpoint(w.models[0], {n: v.int() if n != "w" else v for n, v in base.items()})
    write_checkpoint(w.models[1], dict(base))
    text = run_bad(
        capsys,
        w,
        EXIT_INPUT,
        [
            f"input problem: {w.model_file(0)}: 6 tensors differ in dtype (I32 in model 'm0' "
            "vs I64 in the base), e.g. layers.0.ids, layers.1.ids, layers.2.ids (+3 more): "
            "convert the model to I64 (the base's dtype) before merging, or merge against a "
            "base saved in I32",
        ],
    )
    assert text.count("\n") == 0


def test_smaller_vocabulary_is_one_line_that_says_what_to_do(tmp_path, capsys):
    """A fine-tune whose embeddings and head have fewer rows than the base's (more
    rows, added tokens, merge on the base's vocabulary: test_transformers_models.py)."""
    w = make_world(tmp_path, k=2)
    base = base_tensors()
    base.update(
        {"model.embed_tokens.weight": torch.randn(10, 4), "lm_head.weight": torch.randn(10, 4)}
    )
    write_checkpoint(w.base, base)
    shrunk = finetune(base, 0)
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        shrunk[n] = shrunk[n][:8].clone()
    write_checkpoint(w.models[0], shrunk)
    write_checkpoint(w.models[1], finetune(base, 1))
    run_bad(
        capsys,
        w,
        EXIT_INPUT,
        [
            f"input problem: {w.model_file(0)}: 2 tensors differ in rows (8 in model 'm0' vs "
            "10 in the base), e.g. lm_head.weight, model.embed_tokens.weight: a vocabulary of "
            "another size (added tokens?); resize the model's embeddings to the base's 10 rows",
        ],
    )


def test_many_missing_tensors_are_one_line(tmp_path, capsys):
    w = make_world(tmp_path, k=2)
    base = {f"layers.{i}.w": torch.randn(4, 4) for i in range(8)}
    write_checkpoint(w.base, base)
    write_checkpoint(w.models[0], {"layers.0.w": base["layers.0.w"] + 1})
    write_checkpoint(w.models[1], {n: v + 1 for n, v in base.items()})
    run_bad(
        capsys,
        w,
        EXIT_INPUT,
        [
            f"input problem: {w.model_file(0)}: 7 tensors of the base are missing in model "
            "'m0', e.g. layers.1.w, layers.2.w, layers.3.w (+4 more)",
        ],
    )


def test_header_problems_and_disagreements_reported_together(tmp_path, capsys):
    w = make_world(tmp_path, k=2)
    raw = Path(w.model_file(0)).read_bytes()
    Path(w.model_file(0)).write_bytes(raw[:-10])  # m0: truncated
    m1 = finetune(base_tensors(), 1)
    del m1["c.bias"]  # m1: a tensor missing
    write_checkpoint(w.models[1], m1)
    run_bad(
        capsys,
        w,
        EXIT_INPUT,
        ["2 input problem(s):", "truncated", f"{w.model_file(1)} [c.bias]: missing in model"],
    )


def _sharded_model(w: World, i: int) -> tuple[str, dict]:
    """Rewrite model i as two shards + index; returns (dir, index doc)."""
    shutil.rmtree(w.models[i])
    write_checkpoint(w.models[i], finetune(base_tensors(), i), shards=2)
    idx = os.path.join(w.models[i], "model.safetensors.index.json")
    return w.models[i], json.loads(Path(idx).read_text())


def _write_index(model_dir: str, doc: dict) -> str:
    idx = os.path.join(model_dir, "model.safetensors.index.json")
    Path(idx).write_text(json.dumps(doc))
    return idx


def _outside_file(w: World) -> str:
    """A valid safetensors file outside every checkpoint directory."""
    path = str(w.tmp / "elsewhere" / "x.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({"ids": torch.arange(5)}, path)
    return path


def case_tensor_in_two_shards(w: World) -> list[str]:
    d, _ = _sharded_model(w, 0)
    t = finetune(base_tensors(), 0)
    s1, s2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_file({"a.weight": t["a.weight"], "c.bias": t["c.bias"]}, os.path.join(d, s1))
    save_file({n: t[n] for n in ("a.weight", "b.weight", "ids")}, os.path.join(d, s2))
    _write_index(d, {"weight_map": {"a.weight": s1, "c.bias": s1, "b.weight": s2, "ids": s2}})
    return [os.path.join(d, s1), "[a.weight]", "present in two shards", os.path.join(d, s2)]


def case_index_names_missing_file(w: World) -> list[str]:
    d, doc = _sharded_model(w, 0)
    doc["weight_map"]["ids"] = "model-00003-of-00003.safetensors"
    _write_index(d, doc)
    return [os.path.join(d, "model-00003-of-00003.safetensors"), "does not exist"]


def case_index_path_traversal(w: World) -> list[str]:
    d, doc = _sharded_model(w, 0)
    _outside_file(w)  # it exists: refused for its name, not for being absent
    doc["weight_map"]["ids"] = "../../elsewhere/x.safetensors"
    idx = _write_index(d, doc)
    return [idx, "[ids]", "'../../elsewhere/x.safetensors'", "contains '..'"]


def case_index_absolute_path(w: World) -> list[str]:
    d, doc = _sharded_model(w, 0)
    target = _outside_file(w)
    doc["weight_map"]["ids"] = target
    idx = _write_index(d, doc)
    return [idx, "[ids]", repr(target), "is an absolute path"]


def case_symlinked_shard_escapes(w: World) -> list[str]:
    d, doc = _sharded_model(w, 0)
    shard = os.path.join(d, "model-00002-of-00002.safetensors")
    moved = str(w.tmp / "elsewhere" / "shard2.safetensors")
    os.makedirs(os.path.dirname(moved), exist_ok=True)
    shutil.move(shard, moved)
    os.symlink(moved, shard)
    return [shard, f"resolves to {moved}", "outside the checkpoint directory", "symlink escape"]


def case_symlinked_single_file_escapes(w: World) -> list[str]:
    f = w.model_file(0)
    moved = str(w.tmp / "elsewhere" / "model.safetensors")
    os.makedirs(os.path.dirname(moved), exist_ok=True)
    shutil.move(f, moved)
    os.symlink(moved, f)
    return [f, "outside the checkpoint directory", "symlink escape"]


def case_symlinked_side_file_escapes(w: World) -> list[str]:
    secret = w.tmp / "elsewhere" / "secret.txt"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text("not for the output")
    side = os.path.join(w.base, "config.json")
    os.remove(side)
    os.symlink(secret, side)
    return [side, "side file", "outside the checkpoint directory"]


def case_truncated_file(w: World) -> list[str]:
    f = w.model_file(1)
    raw = Path(f).read_bytes()
    Path(f).write_bytes(raw[:-9])
    return [f, f"]: truncated: needs {len(raw)} bytes, file has {len(raw) - 9}"]


def case_file_shorter_than_prefix(w: World) -> list[str]:
    Path(w.model_file(0)).write_bytes(b"\x10\x00\x00")
    return [w.model_file(0), "3 bytes, shorter than the 8-byte"]


def case_header_length_past_eof(w: World) -> list[str]:
    f = w.model_file(0)
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.write(struct.pack("<Q", size - 7))  # one byte more than the file holds
    return [f, f"header length {size - 7} runs past the end of the file", f"file has {size}"]


def case_header_length_huge(w: World) -> list[str]:
    f = w.model_file(0)
    header, data = read_st(f)
    write_st(f, header, data, prefix=2**62)
    return [f, f"header length {2**62} exceeds the limit"]


def case_offsets_past_eof(w: World) -> list[str]:
    f = w.model_file(0)
    header, data = read_st(f)
    end = len(data)
    header["c.bias"]["data_offsets"] = [end, end + 16]
    write_st(f, header, data)
    return [f, "[c.bias]", "truncated: needs"]


def case_overlapping_offsets(w: World) -> list[str]:
    f = w.model_file(0)
    header, data = read_st(f)
    a0 = header["a.weight"]["data_offsets"][0]
    header["c.bias"]["data_offsets"] = [a0 + 4, a0 + 20]  # 16 bytes inside a.weight
    write_st(f, header, data)
    return [f, "overlaps tensor", "a.weight", "c.bias"]


def case_unsupported_dtype(w: World) -> list[str]:
    f = w.model_file(1)
    header, data = read_st(f)
    header["c.bias"]["dtype"] = "C64"
    write_st(f, header, data)
    return [f, "[c.bias]", "unknown dtype 'C64'"]


def case_header_not_json(w: World) -> list[str]:
    f = w.model_file(0)
    header, data = read_st(f)
    body = json.dumps(header).encode()
    write_st(f, body[: len(body) // 2] + b"\xff" + body[len(body) // 2 :], data)
    return [f, "header is not valid UTF-8"]


def case_duplicate_tensor_entry(w: World) -> list[str]:
    f = w.model_file(0)
    header, data = read_st(f)
    text = json.dumps(header)
    dup = '"c.bias": ' + json.dumps(header["c.bias"])
    write_st(f, ("{" + dup + ", " + text[1:]).encode(), data)
    return [f, "repeats the key 'c.bias'"]


def case_fifo_as_weights(w: World) -> list[str]:
    f = w.model_file(0)
    os.remove(f)
    os.mkfifo(f)
    return [f, "not a regular file"]


def case_no_weights(w: World) -> list[str]:
    os.remove(w.model_file(0))
    return [w.models[0], "no weights found"]


def case_several_unindexed_files(w: World) -> list[str]:
    f = w.model_file(0)
    shutil.copy(f, os.path.join(w.models[0], "a.safetensors"))
    os.rename(f, os.path.join(w.models[0], "b.safetensors"))
    return [w.models[0], "several safetensors files and no", "a.safetensors, b.safetensors"]


def case_pickle_refused(w: World) -> list[str]:
    os.remove(w.model_file(0))
    torch.save(finetune(base_tensors(), 0), os.path.join(w.models[0], "pytorch_model.bin"))
    return [
        os.path.join(w.models[0], "pytorch_model.bin"),
        "never unpickled",
        "allow_pickle",
    ]


def case_base_missing(w: World) -> list[str]:
    shutil.rmtree(w.base)
    return [w.base, "no such file or directory"]


PLAN_TIME_INPUT_CASES = {
    name[len("case_") :]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")
}


@pytest.mark.parametrize("case", sorted(PLAN_TIME_INPUT_CASES))
def test_bad_input_refused_before_writing(tmp_path, capsys, case):
    w = make_world(tmp_path)
    needles = PLAN_TIME_INPUT_CASES[case](w)
    run_bad(capsys, w, EXIT_INPUT, needles)


def test_typo_in_relative_path_is_not_fetched_when_offline(tmp_path, capsys, monkeypatch):
    """A missing 'dir/name' path looks like a Hub repo id: offline, a clean exit 3."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    w = make_world(tmp_path)
    w.cfg["models"][1]["path"] = "in/m1-typo"
    run_bad(capsys, w, EXIT_INPUT, ["in/m1-typo", "not in the local cache"])


# ------------------------------------------------------------------------------------
# pickles
# ------------------------------------------------------------------------------------


def test_pickle_with_allow_pickle_merges_like_safetensors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TADMERGE_CACHE_DIR", str(tmp_path / "cache"))
    w = make_world(tmp_path)
    w.cfg["output"]["path"] = str(tmp_path / "ref_out")
    ref = w.write_cfg("ref.yaml")
    rc, lines = run_cli(capsys, "merge", ref)
    assert rc == EXIT_OK, lines

    os.remove(w.model_file(0))
    torch.save(finetune(base_tensors(), 0), os.path.join(w.models[0], "pytorch_model.bin"))
    w.cfg["output"]["path"] = str(tmp_path / "out")
    cfg = w.write_cfg()
    rc, lines = run_cli(capsys, "merge", cfg)
    check_error(rc, lines, EXIT_INPUT, ["pytorch_model.bin", "allow_pickle"])
    assert not w.out.exists() and not w.staging.exists()

    rc, lines = run_cli(capsys, "merge", cfg, "--allow-pickle")
    assert rc == EXIT_OK, lines
    assert model_bytes(w.out) == model_bytes(tmp_path / "ref_out")
    rc, _ = run_cli(capsys, "verify", str(w.out))
    assert rc == EXIT_OK


class _Payload:
    """A pickle that would create a directory when unpickled by a plain pickle.load."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_malicious_pickle_is_never_executed_even_with_opt_in(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TADMERGE_CACHE_DIR", str(tmp_path / "cache"))
    w = make_world(tmp_path)
    marker = tmp_path / "PWNED"
    os.remove(w.model_file(1))
    bad = os.path.join(w.models[1], "pytorch_model.bin")
    with open(bad, "wb") as f:
        pickle.dump({"a.weight": _Payload(str(marker))}, f, protocol=2)
    rc, lines = run_cli(capsys, "merge", w.write_cfg(), "--allow-pickle")
    check_error(rc, lines, EXIT_INPUT, [bad, "torch.load(weights_only=True) refused"])
    assert not marker.exists(), "the pickle ran code"
    assert not w.out.exists() and not w.staging.exists()


# ------------------------------------------------------------------------------------
# config and output-path errors (exit 2, nothing written)
# ------------------------------------------------------------------------------------


def _cfg_edit(edit):
    def build(w: World) -> None:
        edit(w.cfg, w)

    return build


CONFIG_CASES = {
    "unknown_top_key": (
        _cfg_edit(lambda c, w: c.update(sparsfy={"method": "tadrop"})),
        ["config: unknown key(s) 'sparsfy'"],
    ),
    "unknown_nested_key": (
        _cfg_edit(lambda c, w: c["runtime"].update(worker=2)),
        ["runtime: unknown key(s) 'worker'"],
    ),
    "bad_method": (
        _cfg_edit(lambda c, w: c["merge"].update(method="median")),
        ["merge.method", "'median'"],
    ),
    "bad_size": (
        _cfg_edit(lambda c, w: c["runtime"].update(memory_budget="lots")),
        ["runtime.memory_budget", "'lots'"],
    ),
    "bad_number": (
        _cfg_edit(lambda c, w: c["models"][0].update(weight="heavy")),
        ["models[0].weight", "'heavy'"],
    ),
    "low_q_not_below_high_q": (
        _cfg_edit(
            lambda c, w: c.update(sparsify={"method": "tadrop", "low_q": 0.95, "high_q": 0.5})
        ),
        ["sparsify.low_q (0.95) must be below sparsify.high_q (0.5)"],
    ),
    "low_q_equals_high_q": (
        _cfg_edit(
            lambda c, w: c.update(sparsify={"method": "tadrop", "low_q": 0.5, "high_q": 0.5})
        ),
        ["sparsify.low_q (0.5) must be below sparsify.high_q (0.5)"],
    ),
    "bad_regex": (
        _cfg_edit(lambda c, w: c.update(exclude=["^head\\.", "(unclosed"])),
        ["exclude[1]", "invalid regular expression", "'(unclosed'"],
    ),
    "missing_base": (_cfg_edit(lambda c, w: c.pop("base")), ["base: required"]),
    "no_models": (_cfg_edit(lambda c, w: c.update(models=[])), ["models: expected a non-empty"]),
    "duplicate_names": (
        _cfg_edit(lambda c, w: c["models"][1].update(name="m0")),
        ["models[1].name", "'m0' is used twice"],
    ),
    "memory_budget_below_minimum": (
        _cfg_edit(lambda c, w: c["runtime"].update(memory_budget="10MB")),
        ["runtime.memory_budget", "10 MB is under the minimum of 64 MB for one worker"],
    ),
    "memory_budget_below_minimum_per_worker_decimal": (
        _cfg_edit(lambda c, w: c["runtime"].update(memory_budget="200MB", workers=4)),
        [
            "runtime.memory_budget (--memory-budget): 200 MB shared by 4 local workers is "
            "50 MB each, under the minimum of 64 MB per worker (4 workers × 64 MB = 256 MB); "
            "set it to at least 256 MB, or runtime.workers (--workers) to 3"
        ],
    ),
    "memory_budget_below_minimum_per_worker_binary": (
        _cfg_edit(lambda c, w: c["runtime"].update(memory_budget="200MiB", workers=4)),
        [
            "200 MiB shared by 4 local workers is 50 MiB each, under the minimum of 61.1 MiB "
            "per worker (4 workers × 61.1 MiB = 244.4 MiB); set it to at least 244.4 MiB"
        ],
    ),
    "unknown_kernels": (
        _cfg_edit(lambda c, w: c["runtime"].update(kernels="cuda")),
        ["runtime.kernels", "cuda"],
    ),
    "output_inside_input": (
        _cfg_edit(lambda c, w: c["output"].update(path=os.path.join(w.base, "merged"))),
        ["is inside the input checkpoint", "<base>"],
    ),
    "output_is_input": (
        _cfg_edit(lambda c, w: c["output"].update(path=w.models[1])),
        ["is the input checkpoint"],
    ),
    "input_inside_output": (
        _cfg_edit(lambda c, w: c["output"].update(path=str(w.tmp / "in"))),
        ["is inside the output"],
    ),
    "output_symlink_into_input": (
        _cfg_edit(
            lambda c, w: (
                os.symlink(w.models[0], w.tmp / "link"),
                c["output"].update(path=str(w.tmp / "link")),
            )
        ),
        ["is the input checkpoint"],
    ),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_refused_before_writing(tmp_path, capsys, case):
    w = make_world(tmp_path)
    build, needles = CONFIG_CASES[case]
    build(w)
    needles = [w.base if n == "<base>" else n for n in needles]
    run_bad(capsys, w, EXIT_CONFIG, needles)


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--memory-budget", "lots"], "--memory-budget"),
        (["--workers", "0"], "--workers"),
        (["--dtype", "int8"], "--dtype"),
        (["--shard-size", "0GB"], "--shard-size"),
    ],
)
def test_bad_cli_override_refused(tmp_path, capsys, flags, needle):
    w = make_world(tmp_path)
    run_bad(capsys, w, EXIT_CONFIG, [needle], *flags)


@pytest.mark.parametrize(
    "flags",
    [
        ["--memory-budget", "64MB", "--workers", "1"],  # the minimum, decimal
        ["--memory-budget", "64MiB", "--workers", "1"],
        ["--memory-budget", "256MB", "--workers", "4"],  # the values the message suggests
        ["--memory-budget", "244.4MiB", "--workers", "4"],
        ["--memory-budget", "200MB", "--workers", "3"],
    ],
)
def test_memory_budget_minimum_accepted_in_either_notation(tmp_path, capsys, flags):
    w = make_world(tmp_path)
    rc, lines = run_cli(capsys, "plan", w.write_cfg(), *flags)
    assert rc == EXIT_OK, lines


@pytest.mark.parametrize(
    "text, needles",
    [
        (None, ["<path>", "config file not found"]),
        ("base: [unclosed", ["<path>", "not valid YAML", "line 1"]),
        ("", ["<path>", "the config is empty"]),
        ("- just\n- a list\n", ["config: expected a mapping, got list"]),
    ],
)
def test_unreadable_config_file(tmp_path, capsys, text, needles):
    path = tmp_path / "merge.yaml"
    if text is not None:
        path.write_text(text)
    before = snapshot(tmp_path)
    rc, lines = run_cli(capsys, "merge", str(path))
    check_error(rc, lines, EXIT_CONFIG, [str(path) if n == "<path>" else n for n in needles])
    assert snapshot(tmp_path) == before


def test_config_with_two_errors_reports_both(tmp_path, capsys):
    w = make_world(tmp_path)
    w.cfg["merge"]["method"] = "tie"
    w.cfg["runtime"]["workers"] = 0
    run_bad(capsys, w, EXIT_CONFIG, ["2 config problems", "merge.method", "runtime.workers"])


def test_output_under_a_regular_file(tmp_path, capsys):
    w = make_world(tmp_path)
    (tmp_path / "notes.txt").write_text("a file, not a directory")
    w.cfg["output"]["path"] = str(tmp_path / "notes.txt" / "out")
    cfg = w.write_cfg()
    before = snapshot(tmp_path)
    rc, lines = run_cli(capsys, "merge", cfg)
    text = check_error(rc, lines, EXIT_CONFIG, [str(tmp_path / "notes.txt")])
    assert snapshot(tmp_path) == before
    assert "interrupted merge" not in text and "--resume" not in text, text


def test_hostile_tensor_name_stays_on_one_line(tmp_path, capsys):
    w = make_world(tmp_path)
    f = w.model_file(0)
    header, data = read_st(f)
    header["evil\ntadmerge: error: forged line"] = dict(header["c.bias"])
    write_st(f, header, data)  # same bytes as c.bias: an extra tensor (and an overlap)
    rc, lines = run_cli(capsys, "merge", w.write_cfg())
    check_error(rc, lines, EXIT_INPUT, [f])
    assert not any(ln.startswith("tadmerge: error: forged") for ln in lines), lines


def test_verify_detects_a_tampered_output(tmp_path, capsys):
    w = make_world(tmp_path)
    rc, lines = run_cli(capsys, "merge", w.write_cfg())
    assert rc == EXIT_OK, lines
    capsys.readouterr()
    assert main(["verify", str(w.out)]) == EXIT_OK
    assert capsys.readouterr().out == f"OK {w.out}: every file matches its manifest\n"
    shard = w.out / "model.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0x01
    shard.write_bytes(bytes(raw))
    (w.out / "stray.bin").write_bytes(b"x")
    assert main(["verify", str(w.out)]) == EXIT_INPUT
    out = capsys.readouterr().out.splitlines()
    assert f"FAIL {shard}: sha256 differs from the manifest (content changed)" in out
    assert f"FAIL {w.out / 'stray.bin'}: not in the manifest" in out


def test_output_exists_refused_and_kept(tmp_path, capsys):
    w = make_world(tmp_path)
    w.out.mkdir()
    (w.out / "precious.txt").write_text("keep me")
    cfg = w.write_cfg()
    before = snapshot(tmp_path)
    rc, lines = run_cli(capsys, "merge", cfg)
    check_error(rc, lines, EXIT_CONFIG, [str(w.out), "already exists", "--overwrite"])
    rc, lines = run_cli(capsys, "merge", cfg, "--overwrite")
    check_error(rc, lines, EXIT_CONFIG, [str(w.out), "not a tadmerge output"])
    assert snapshot(tmp_path) == before
    assert not w.staging.exists()


# ------------------------------------------------------------------------------------
# problems found while reading data (exit 3, nothing published)
# ------------------------------------------------------------------------------------


def _nonfinite_world(tmp_path) -> World:
    w = make_world(tmp_path)
    base = base_tensors()
    m0 = finetune(base, 0)
    m0["a.weight"][0, :3] = float("nan")  # rows 0..32: the first unit of a.weight
    write_checkpoint(w.models[0], m0)
    m1 = finetune(base, 1)
    m1["c.bias"][1] = float("inf")
    m1["c.bias"][2] = float("-inf")
    write_checkpoint(w.models[1], m1)
    return w


def test_nan_and_inf_refused_while_reading(tmp_path, capsys):
    w = _nonfinite_world(tmp_path)
    cfg = w.write_cfg()
    inputs_before = snapshot(tmp_path / "in")
    rc, lines = run_cli(capsys, "merge", cfg)
    text = check_error(rc, lines, EXIT_INPUT, ["NaN/Inf", "allow_nonfinite"])
    nan = f"{w.model_file(0)} [a.weight]: 3 NaN/Inf value(s)"
    inf = f"{w.model_file(1)} [c.bias]: 2 NaN/Inf value(s)"
    assert nan in text or inf in text, text
    assert_not_published(w)
    assert snapshot(tmp_path / "in") == inputs_before
    # the headers were fine: plan succeeds and writes nothing
    rc, _ = run_cli(capsys, "plan", cfg)
    assert rc == EXIT_OK


@pytest.mark.parametrize("method,k", [("task_arithmetic", 2), ("slerp", 1)])
def test_a_float64_value_beyond_float32_is_named_in_its_file(tmp_path, capsys, method, k):
    """float64 inputs merge in float32, where a finite value beyond float32's range
    is Inf: the file holding it (here the base) and its tensor are named as for a
    NaN, not taken for a difference that overflowed (which names the last model),
    when its unit streams from the raw inputs (a.weight is split)."""
    w = make_world(tmp_path, k=k)
    base = {n: v.double() if n == "a.weight" else v for n, v in base_tensors().items()}
    for i in range(k):
        write_checkpoint(w.models[i], finetune(base, i))
    base["a.weight"][40, 0] = 1e39  # rows 32..64: the second unit
    write_checkpoint(w.base, base)
    w.cfg["merge"] = {"method": method}
    rc, lines = run_cli(capsys, "merge", w.write_cfg())
    base_file = os.path.join(w.base, "model.safetensors")
    text = check_error(rc, lines, EXIT_INPUT, [f"{base_file} [a.weight]: 1 NaN/Inf value(s)"])
    assert not any(w.model_file(i) in text for i in range(k)), text
    assert_not_published(w)


def test_nan_allowed_with_opt_in(tmp_path, capsys):
    w = _nonfinite_world(tmp_path)
    w.cfg["inputs"] = {"allow_nonfinite": True}
    rc, lines = run_cli(capsys, "merge", w.write_cfg())
    assert rc == EXIT_OK, lines
    rc, _ = run_cli(capsys, "verify", str(w.out))
    assert rc == EXIT_OK


def test_all_nonfinite_tensors_reported_with_tensor_counts(tmp_path, capsys):
    w = make_world(tmp_path)
    base = base_tensors()
    m0 = finetune(base, 0)
    m0["a.weight"][0, :3] = float("nan")  # unit rows 0..32
    m0["a.weight"][40, 0] = float("nan")  # unit rows 32..64
    write_checkpoint(w.models[0], m0)
    m1 = finetune(base, 1)
    m1["c.bias"][1:3] = float("inf")
    write_checkpoint(w.models[1], m1)
    rc, lines = run_cli(capsys, "merge", w.write_cfg())
    check_error(
        rc,
        lines,
        EXIT_INPUT,
        [
            f"{w.model_file(0)} [a.weight]: 4 NaN/Inf value(s)",
            f"{w.model_file(1)} [c.bias]: 2 NaN/Inf value(s)",
        ],
    )


def test_rerun_after_fixing_a_nonfinite_input_succeeds(tmp_path, capsys):
    w = _nonfinite_world(tmp_path)
    cfg = w.write_cfg()
    rc, _ = run_cli(capsys, "merge", cfg)
    assert rc == EXIT_INPUT
    base = base_tensors()
    write_checkpoint(w.models[0], finetune(base, 0))
    write_checkpoint(w.models[1], finetune(base, 1))
    rc, lines = run_cli(capsys, "merge", cfg)
    assert rc == EXIT_OK, lines


def test_non_float_buffer_that_differs_is_refused(tmp_path, capsys):
    w = make_world(tmp_path)
    m1 = finetune(base_tensors(), 1)
    m1["ids"] = m1["ids"] + 1
    write_checkpoint(w.models[1], m1)
    rc, lines = run_cli(capsys, "merge", w.write_cfg())
    check_error(
        rc,
        lines,
        EXIT_INPUT,
        [f"{w.model_file(1)} [ids]: non-floating tensor differs from the base in model 'm1'"],
    )
    assert_not_published(w)


def test_file_truncated_after_its_header_was_checked(tmp_path, capsys, monkeypatch):
    """A file another team re-uploads mid-merge: its size is not the planned one, so
    it changed during the merge, an input error (tests/test_input_changes.py has
    the other ways an input changes)."""
    import tadmerge.run.driver as driver

    w = make_world(tmp_path)
    real = driver.make_plan
    f = w.model_file(1)

    def plan_then_truncate(cfg, **kw):
        plan = real(cfg, **kw)
        size = os.path.getsize(f)
        os.truncate(f, size - 100)
        return plan

    monkeypatch.setattr(driver, "make_plan", plan_then_truncate)
    rc, lines = run_cli(capsys, "merge", w.write_cfg())
    check_error(rc, lines, EXIT_INPUT, [f, "changed during the merge: size changed"])
    assert re.search(r"\[(a\.weight|b\.weight|c\.bias|ids)\]", lines[0])
    assert_not_published(w)
    assert not w.staging.exists()


def test_debug_prints_a_traceback(tmp_path, capsys):
    w = make_world(tmp_path)
    case_truncated_file(w)
    cfg = w.write_cfg()
    rc, lines = run_cli(capsys, "merge", cfg)
    assert rc == EXIT_INPUT and not any("Traceback" in ln for ln in lines)
    capsys.readouterr()
    rc = main(["--debug", "merge", cfg])
    err = capsys.readouterr().err
    assert rc == EXIT_INPUT
    assert "Traceback (most recent call last)" in err
    assert "tadmerge.errors.InputError" in err
    assert err.rstrip().splitlines()[-1].startswith("tadmerge: error: input problem: ")
    assert not w.out.exists() and not w.staging.exists()


# ------------------------------------------------------------------------------------
# fuzz: random corruptions of a valid checkpoint, through the whole merge
# ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    w = make_world(tmp, k=2)
    raw = Path(w.model_file(1)).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return w, raw, 8 + n


def _run_corrupted(capsys, fuzz_world, edits, in_header: bool, cut: int = 0):
    w, raw, data_start = fuzz_world
    buf = bytearray(raw)
    for pos, value in edits:
        pos = pos % data_start if in_header else data_start + pos % (len(raw) - data_start)
        buf[pos] = value
    if cut:
        del buf[-cut:]
    case = Path(tempfile.mkdtemp(dir=w.tmp))
    mdir = case / "m1"
    mdir.mkdir()
    bad = str(mdir / "model.safetensors")
    Path(bad).write_bytes(bytes(buf))
    cfg = json.loads(json.dumps(w.cfg))
    cfg["models"][1]["path"] = str(mdir)
    cfg["output"]["path"] = str(case / "out")
    (case / "merge.yaml").write_text(yaml.safe_dump(cfg))
    before = snapshot(case)
    rc, lines = run_cli(capsys, "merge", str(case / "merge.yaml"))
    text = "\n".join(lines)
    assert rc in (EXIT_OK, EXIT_INPUT), f"exit {rc}:\n{text}"
    out = case / "out"
    if rc == EXIT_OK:
        assert run_cli(capsys, "verify", str(out))[0] == EXIT_OK
        shutil.rmtree(case)
        return rc, text
    check_error(rc, lines, EXIT_INPUT, [bad])
    assert not out.exists()
    if in_header or cut:  # refused from the header alone: nothing written at all
        assert snapshot(case) == before, text
    else:
        assert re.search(r"\[(a\.weight|b\.weight|c\.bias|ids)\]", text), text
    shutil.rmtree(case)
    return rc, text


# Byte values: anything, and more often the ones that keep a JSON header parseable (so
# shapes, offsets and dtypes get checked) or that turn floats into NaN/Inf.
_BYTE = st.one_of(
    st.integers(0, 255),
    st.sampled_from(list(b'0123456789 ",:[]{}FIU')),
    st.sampled_from([0x7F, 0xFF, 0x80]),
)
_EDITS = st.lists(st.tuples(st.integers(0, 2**31), _BYTE), min_size=1, max_size=6)
_FUZZ = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@_FUZZ
@given(edits=_EDITS)
def test_fuzz_header_region(capsys, fuzz_world, edits):
    """Corrupt bytes of the prefix or JSON: refused before anything is written (or, when
    the change is harmless, e.g. in padding or metadata, a verified output)."""
    _run_corrupted(capsys, fuzz_world, edits, in_header=True)


@_FUZZ
@given(edits=_EDITS, cut=st.one_of(st.just(0), st.integers(1, 64)))
def test_fuzz_data_region(capsys, fuzz_world, edits, cut):
    """Corrupt tensor bytes (and maybe cut the file short): a verified output or a clean
    error naming the tensor; a cut file is refused before anything is written."""
    _run_corrupted(capsys, fuzz_world, edits, in_header=False, cut=cut)
