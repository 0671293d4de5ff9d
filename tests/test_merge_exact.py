"""Every (sparsifier, combiner, scope) against the reference, whole and split.

Each case merges the test zoo twice: once with whole tensors and one worker,
once split into small row blocks with two workers. Both must give the same
bytes, and the whole run must equal the reference (tests/reference.py) bit for
bit. EMR is checked on its unified delta, masks and rescalers.
"""

from __future__ import annotations

import math
import os

import pytest
import reference as R
import torch
from checkpoints import write_zoo
from safetensors.torch import load_file

from tadmerge.cluster import stats as stats_stage
from tadmerge.config import parse_config
from tadmerge.emr.store import MaskStore
from tadmerge.engine import block as engine_block
from tadmerge.engine import kernels, native
from tadmerge.io import publish
from tadmerge.run.driver import run_merge

SPARSIFIERS = {
    "none": {"method": "none", "rescale": "none"},
    "tadrop": {"method": "tadrop", "low_q": 0.5, "high_q": 0.95, "rescale": "l2"},
    "magnitude": {"method": "magnitude", "density": 0.3, "rescale": "none"},
    "random": {"method": "random", "p": 0.6, "rescale": "inverse_keep"},
    "della": {"method": "della", "density": 0.5, "epsilon": 0.2, "rescale": "inverse_keep"},
    "breadcrumbs": {"method": "breadcrumbs", "density": 0.6, "gamma": 0.05, "rescale": "none"},
}
COMBINERS = ["average", "linear", "task_arithmetic", "ties", "emr"]
BLOCK = 64  # canonical block elements: small so that the zoo splits into many blocks
WEIGHTS = [1.0, 0.5, 2.0]


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    return root, write_zoo(str(root))


def config(
    root, paths, sp: dict, method: str, scope: str, out: str, split: bool, kernels: str = "auto"
):
    base, models = paths
    raw = {
        "base": base,
        "models": [
            {"path": p, "name": f"t{i}", "weight": WEIGHTS[i]} for i, p in enumerate(models)
        ],
        "sparsify": {**sp, "scope": scope},
        "merge": {"method": method, "scale": 0.7, "disjoint": "mean"},
        "exclude": ["^head\\."],
        "output": {"path": str(root / out)},
        "runtime": {"block_elements": BLOCK, "progress": "none", "kernels": kernels},
        "seed": 7,
    }
    if split:
        raw["runtime"].update(workers=2, max_unit_elements=2 * BLOCK, memory_budget="256MB")
    return parse_config(raw)


def reference_merge(base: dict, models: list[dict], sp: dict, method: str, scope: str):
    names = [n for n in sorted(base) if base[n].is_floating_point() and n != "head.weight"]
    taus = [{n: m[n].float() - base[n].float() for n in names} for m in models]
    ts: list[dict] = []
    for k, tau in enumerate(taus):
        if scope == "global" and sp["method"] in ("tadrop", "magnitude", "breadcrumbs"):
            ts.append(R.global_sparsify(tau, sp))
        else:
            ts.append(
                {
                    n: R.sparsify(
                        tau[n],
                        sp,
                        task=k,
                        name=n,
                        seed=7,
                        block_rows=max(1, BLOCK // _row_numel(base[n].shape)),
                    )  # fmt: skip
                    for n in names
                }
            )
    out = {}
    if method == "emr":
        abs_t = [[] for _ in models]
        abs_u = [[] for _ in models]
        for n in names:
            uni, masks, at, au = R.emr([t[n] for t in ts])
            out[n] = (uni, masks)
            for k in range(len(models)):
                abs_t[k].append(at[k] / base[n].numel())
                abs_u[k].append(au[k] / base[n].numel())
        lam = [math.fsum(a) / math.fsum(b) if math.fsum(b) > 0 else 1.0
               for a, b in zip(abs_t, abs_u, strict=True)]  # fmt: skip
        return out, lam
    for n in names:
        merged = R.combine(
            method,
            base[n].float(),
            [m[n].float() for m in models],
            [t[n] for t in ts],
            WEIGHTS,
            0.7,
            sparse=sp["method"] != "none",
        )
        out[n] = merged.to(base[n].dtype)
    for n in base:
        if n not in out:
            out[n] = base[n]
    return out, None


def spy_streamed_digests(monkeypatch) -> list[set[str]]:
    """Per published merge, the files whose digests were streamed (io/digest.py)."""
    calls: list[set[str]] = []
    real = publish.write_manifest

    def spy(directory, exclude=None, known=None):
        calls.append(set(known or {}))
        return real(directory, exclude, known)

    monkeypatch.setattr(publish, "write_manifest", spy)
    return calls


def _row_numel(shape) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def _files(d: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(d):
        for f in files:
            if f in ("merge_report.json", "manifest.json", "merge_config.yaml", "README.md"):
                continue
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, d)] = fh.read()
    return out


CASES = [
    (s, c, scope)
    for s in SPARSIFIERS
    for c in COMBINERS
    for scope in ("tensor", "global")
    if not (scope == "global" and s in ("none", "random", "della"))  # scope has no effect
]


@pytest.mark.parametrize("sname,method,scope", CASES)
def test_matches_reference_whole_and_split(zoo_dir, sname, method, scope, monkeypatch):
    root, (paths, base, models) = zoo_dir[0], (zoo_dir[1][:2], zoo_dir[1][2], zoo_dir[1][3])
    sp = SPARSIFIERS[sname]
    tag = f"{sname}-{method}-{scope}"
    streamed = spy_streamed_digests(monkeypatch)
    whole = run_merge(config(root, paths, sp, method, scope, f"{tag}-whole", False))
    split = run_merge(config(root, paths, sp, method, scope, f"{tag}-split", True))
    assert any(len(t.units) > 1 for t in split.plan.tensors), "split run did not split"
    assert _files(whole.output) == _files(split.output), "split run changed the bytes"
    # the shards were hashed while written (TIES: split blocks after their reruns),
    # and the manifest holds the digests of the bytes as they were published
    for res in (whole, split):
        assert streamed.pop(0) == {s.filename for s in res.plan.shards}
        assert publish.verify_output(res.output) == []
    # exact statistics read the inputs again only for groups spread over several units
    if scope == "tensor" or sname in ("none", "random", "della"):
        assert whole.report["reads"]["stats_read_bytes"] == 0
    if sname in ("tadrop", "magnitude", "breadcrumbs"):
        assert split.report["reads"]["stats_rounds"] >= 2
        assert split.report["reads"]["stats_read_bytes"] > 0
    # the apply phase works in chunks of a block: an odd chunk size cuts through
    # rows and runs of tied magnitudes, and must not change a byte either
    monkeypatch.setattr(engine_block, "CHUNK_ELEMENTS", 37)
    chunked = run_merge(config(root, paths, sp, method, scope, f"{tag}-chunked", False))
    assert _files(whole.output) == _files(chunked.output), "chunking changed the bytes"
    # the C kernels (auto, where they build) and the torch reference give the same
    # bytes: statistics, the cut, TIES, EMR, the stream of merges without a sparsifier
    if sname in ("tadrop", "magnitude", "breadcrumbs", "none"):
        # runtime.kernels: torch; split: the statistics rounds run too
        other = run_merge(config(root, paths, sp, method, scope, f"{tag}-torch", True, "torch"))
        assert _files(whole.output) == _files(other.output), "the torch reference changed bytes"
        assert (whole.report["dispatch"]["kernels"], other.report["dispatch"]["kernels"]) == (
            "c" if native.available() else "torch",
            "torch",
        )
    if sname in ("tadrop", "magnitude", "breadcrumbs"):
        # the cuts' tie shares come from the per-unit fine histograms the driver
        # kept; without them (past their memory share) from a round of tie counts
        assert "ties" not in split.report["reads"]["round_kinds"]
        monkeypatch.setattr(stats_stage, "PER_UNIT_SHARE", 1 << 62)
        counted = run_merge(config(root, paths, sp, method, scope, f"{tag}-counted", True))
        assert _files(whole.output) == _files(counted.output), "tie round changed the bytes"
        assert "ties" in counted.report["reads"]["round_kinds"]

    expected, lam = reference_merge(base, models, sp, method, scope)
    if method == "emr":
        got = load_file(os.path.join(whole.output, "model.safetensors"))
        store = MaskStore(os.path.join(whole.output, "masks.zarr"))
        for t in whole.plan.tensors:
            if t.kind != "merge":
                assert t.name not in got
                continue
            uni, masks = expected[t.name]
            assert torch.equal(got[t.name], uni), t.name
            rows = t.shape[0] if t.shape else 1
            for k, m in enumerate(masks):
                mk = store.read(t.index, t.shape, t.rng_rows, k, 0, rows)
                assert torch.equal(mk, m.reshape(-1)), (t.name, k)
        rescalers = whole.report["emr"]["rescalers"]
        assert [rescalers[f"t{k}"] for k in range(3)] == lam
        return
    got = load_file(os.path.join(whole.output, "model.safetensors"))
    assert set(got) == set(expected)
    for n, v in expected.items():
        assert got[n].dtype == v.dtype, n
        assert torch.equal(got[n].view(-1), v.reshape(-1)), n


def test_ties_majority_on_split_tensor_with_exact_cancellations(tmp_path, monkeypatch):
    """Votes that cancel exactly take the tensor's majority sign, even across blocks.

    Half the entries cancel (+x and -x); the rest vote negative, so the majority is
    -1 and the provisional +1 of the split run must be corrected by reruns.
    """
    from checkpoints import write_checkpoint

    g = torch.Generator().manual_seed(3)
    base = torch.randn(64, 32, generator=g)
    x = torch.rand(64, 32, generator=g) + 0.1
    cancel = torch.rand(64, 32, generator=g) < 0.5
    m1 = torch.where(cancel, base + x, base - x)
    m2 = torch.where(cancel, base - x, base - 2 * x)
    # exact cancellation needs (m1 - base) == -(m2 - base) bit for bit
    d1, d2 = m1 - base, m2 - base
    cancel &= d1 == -d2
    paths = []
    for name, t in (("base", base), ("m1", m1), ("m2", m2)):
        paths.append(write_checkpoint(str(tmp_path / name), {"w": t}))
    raw = {
        "base": paths[0],
        "models": [{"path": paths[1]}, {"path": paths[2]}],
        "merge": {"method": "ties"},
        "output": {"path": str(tmp_path / "whole")},
        "runtime": {"progress": "none", "block_elements": 64},
    }
    whole = run_merge(parse_config(raw))
    raw["output"] = {"path": str(tmp_path / "split")}
    raw["runtime"].update(max_unit_elements=128, workers=2, memory_budget="256MB")
    streamed = spy_streamed_digests(monkeypatch)
    split = run_merge(parse_config(raw))
    assert len(split.plan.tensors[0].units) > 1
    # the rerun blocks rewrote their bytes: the streamed digest saw the final ones
    assert streamed == [{"model.safetensors"}]
    assert publish.verify_output(split.output) == []
    ref = R.combine("ties", base, [m1, m2], [d1, d2], [1.0, 1.0], 1.0)
    for out in (whole.output, split.output):
        got = load_file(os.path.join(out, "model.safetensors"))["w"]
        assert torch.equal(got, ref)
    # where votes cancelled, the negative majority kept the negative task's entry
    assert cancel.any()
    assert torch.equal(ref[cancel], (base + d2)[cancel])


@pytest.mark.skipif(not native.available(), reason="no C kernels")
@pytest.mark.parametrize("sname", ["tadrop", "magnitude", "breadcrumbs"])
def test_bf16_split_tensors_take_one_statistics_round(zoo_dir, sname, monkeypatch):
    """bf16 task vectors: the units set their few keys with low bits aside in the
    coarse round (histogram.KeysAside), and the driver makes every fine histogram
    and tie share from those: no fine round, no tie round, the same bytes.

    The zoo's blocks are tiny (at most n/16 keys set aside is a handful) and its
    small bf16 weights move by many ulps: with the share lifted every block is
    taken as sparse, which exercises the path whatever the data."""
    root, (paths, _, _) = zoo_dir[0], (zoo_dir[1][:2], zoo_dir[1][2], zoo_dir[1][3])

    def merge(out: str, split: bool, backend: str):
        cfg = config(root, paths, SPARSIFIERS[sname], "task_arithmetic", "tensor", out, split)
        bf16_only = [*cfg.exclude, "^layers\\.0\\.(attn|bias)", "^zero\\.", "^scale$"]
        raw = {**cfg.to_dict(), "exclude": bf16_only}
        raw["runtime"]["kernels"] = backend
        return run_merge(parse_config(raw))

    whole = merge(f"bf16-{sname}-whole", False, "torch")
    rounds = merge(f"bf16-{sname}-torch", True, "torch")
    monkeypatch.setattr(kernels, "SIDE_SHARE", 1)
    aside = merge(f"bf16-{sname}-c", True, "c")
    assert {t.dtype for t in aside.plan.tensors if t.kind == "merge"} == {"BF16"}
    assert _files(whole.output) == _files(rounds.output) == _files(aside.output)
    assert rounds.report["reads"]["round_kinds"][:2] == ["coarse", "fine"]
    assert aside.report["reads"]["round_kinds"] == ["coarse"]


def test_keys_aside_past_their_share_drop_only_the_group_that_overflows():
    """The keys set aside are kept while they fit their share of the budget;
    past it only the group whose keys overflow takes fine rounds."""

    class Keys:
        nbytes = 10

    a, b = ("t", 0, 0), ("t", 1, 0)
    held = stats_stage.AsideKeys({a: [0, 1], b: [2]}, limit=25)
    held.add(a, 0, Keys())
    held.add(b, 2, Keys())
    held.add(a, 1, Keys())  # 30 bytes: a goes (its fine histograms from rounds), b stays
    assert not held.complete(a) and held.complete(b)
    assert held.bytes == 10
    held.add(a, 0, Keys())  # a dropped group takes no more keys
    assert held.bytes == 10 and not held.complete(a)


@pytest.mark.skipif(not native.available(), reason="no C kernels")
@pytest.mark.parametrize("sname", ["tadrop", "magnitude"])
def test_report_norms_of_tensors_resolved_whole_are_exact(zoo_dir, sname):
    """With the C kernels, a tensor resolved from its own block reports ‖τ‖ from the
    exact moments (no float32 pass) and ‖t‖ as fl32(scale)·‖kept τ‖."""
    root, (paths, base, models) = zoo_dir[0], (zoo_dir[1][:2], zoo_dir[1][2], zoo_dir[1][3])
    sp = SPARSIFIERS[sname]
    cfg = config(root, paths, sp, "task_arithmetic", "tensor", f"norms-{sname}", False, "c")
    res = run_merge(cfg)
    expected, _ = reference_merge(base, models, sp, "task_arithmetic", "tensor")
    checked = 0
    for name, fig in res.report["tensors"].items():
        if fig["kind"] != "merge" or not base[name].numel():
            continue
        for k, m in enumerate(models):
            tau = m[name].float() - base[name].float()
            st = fig["tasks"][f"t{k}"]
            assert st["norm"] == pytest.approx(math.sqrt(R.fsum_sq(tau)), rel=1e-15, abs=0)
            t = R.sparsify(tau, sp, task=k, name=name, seed=7, block_rows=1)
            assert st["norm_after"] == pytest.approx(math.sqrt(R.fsum_sq(t)), rel=1e-6)
            checked += 1
    assert checked


@pytest.mark.skipif(not native.available(), reason="no C kernels")
@pytest.mark.parametrize("method", ["task_arithmetic", "average"])
def test_bf16_magnitude_merges_stream_from_the_raw_inputs(zoo_dir, method, monkeypatch):
    """bf16 inputs, a magnitude selection, task arithmetic or averaging: every unit,
    whole or a block of a split tensor, is merged from its raw 16-bit blocks
    (engine/raw.py) with no float32 block made: the bytes of the torch path, and
    the split tensors' report norms are their exact moments'."""
    from tadmerge.cluster import engine_units, worker

    root, (paths, base, models) = zoo_dir[0], (zoo_dir[1][:2], zoo_dir[1][2], zoo_dir[1][3])
    sp = SPARSIFIERS["tadrop"]

    def merge(out: str, split: bool, backend: str):
        cfg = config(root, paths, sp, method, "tensor", out, split)
        bf16_only = [*cfg.exclude, "^layers\\.0\\.(attn|bias)", "^zero\\.", "^scale$"]
        raw = {**cfg.to_dict(), "exclude": bf16_only}
        raw["runtime"]["kernels"] = backend
        return run_merge(parse_config(raw))

    whole = merge(f"raw-{method}-torch", False, "torch")
    monkeypatch.setattr(kernels, "SIDE_SHARE", 1)  # the zoo's tiny blocks count as sparse
    used = {"raw": 0, "block": 0}
    real_raw, real_block = worker.merge_raw_sparse, engine_units.merge_block

    def spy_raw(*a, **kw):
        got = real_raw(*a, **kw)
        used["raw"] += got is not None
        return got

    def spy_block(*a, **kw):
        used["block"] += 1
        return real_block(*a, **kw)

    monkeypatch.setattr(worker, "merge_raw_sparse", spy_raw)
    monkeypatch.setattr(engine_units, "merge_block", spy_block)
    split = merge(f"raw-{method}-c", True, "c")
    merged_units = [u for t in split.plan.tensors if t.kind == "merge" for u in t.units]
    assert used == {"raw": len(merged_units), "block": 0}
    assert any(len(t.units) > 1 for t in split.plan.tensors if t.kind == "merge")
    assert _files(whole.output) == _files(split.output)
    checked = 0
    for t in split.plan.tensors:
        if t.kind != "merge" or len(t.units) < 2:
            continue
        for k, m in enumerate(models):
            tau = m[t.name].float() - base[t.name].float()
            fig = split.report["tensors"][t.name]["tasks"][f"t{k}"]
            assert fig["norm"] == pytest.approx(math.sqrt(R.fsum_sq(tau)), rel=1e-15, abs=0)
            ts = R.sparsify(tau, sp, task=k, name=t.name, seed=7, block_rows=1)
            assert fig["norm_after"] == pytest.approx(math.sqrt(R.fsum_sq(ts)), rel=1e-6)
            checked += 1
    assert checked
