"""Hub inputs: planned from their headers, downloaded shard by shard at one commit.

A hub id (``org/name`` or ``org/name@revision``) is resolved ONCE to its commit
sha (``HfApi.model_info``); every later read names that commit, so a push to the
repo while a merge runs cannot mix two versions of it. Planning reads only:

- the repo's small files (config.json, the shard index, tokenizer files) through
  ``snapshot_download`` at the commit, with the weights left out;
- each safetensors header through huggingface_hub's metadata API
  (``HfApi.parse_safetensors_file_metadata``: HTTP range requests for the header
  bytes, never the tensor data), for the shards the directory rules of
  io/checkpoint.py pick (the index's shards, else model.safetensors, else the one
  safetensors file).

So every input's names, dtypes and shapes are checked against the others before a
byte of weights is fetched, and ``tadmerge plan`` on hub models downloads no
weights. A merge then downloads the weights with ``hf_hub_download`` at the commit,
one shard at a time, opens the snapshot as a local directory (every header validated
again, every file's identity recorded as for local files) and requires each shard's
tensor table to be the one planned.

A repo with no safetensors weights (pickles only) or a LoRA adapter (small) is
fetched whole at the commit, as before.

Every file of a hub input is versioned by its commit (in its key) and the digest of
its tensor table (name, dtype, shape, data offsets): the same from the header-only
plan and from the downloaded file, so ``tadmerge plan`` prints the fingerprint the
merge records and ``--if-changed`` decides without downloading weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import replace

from tadmerge.errors import InputError, InputProblem
from tadmerge.io.safetensors_format import DTYPE_SIZE, TensorEntry

log = logging.getLogger("tadmerge")

__all__ = ["open_headers", "fetch_weights", "tensor_table_digest", "WHOLE"]

# what the header-only pass downloads: everything the checkpoint rules read but weights
SIDE_PATTERNS = ["*.json", "tokenizer*", "*.model", "*.txt"]
WHOLE = object()  # open_headers' answer for a repo fetched whole (pickles, an adapter)


def tensor_table_digest(rows: Iterable[tuple[str, str, tuple[int, ...], int, int]]) -> str:
    """sha256 of a file's tensor table: (name, dtype, shape, start, end), start and end
    relative to the data section, sorted by name. A header-only plan and a download of
    the same commit give the same digest."""
    doc = sorted([n, d, list(s), a, b] for n, d, s, a, b in rows)
    return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()


def local_versions(files: Iterable[str], tensors: dict[str, TensorEntry]) -> tuple:
    """(path, tensor table digest) of each downloaded file, from its validated header."""
    rows: dict[str, list] = {f: [] for f in files}
    for e in tensors.values():
        if e.file in rows and e.identity is not None:
            start = e.offset - e.identity.header_len
            rows[e.file].append((e.name, e.dtype, tuple(e.shape), start, start + e.nbytes))
    return tuple(sorted((f, tensor_table_digest(r)) for f, r in rows.items()))


def resolve_commit(repo_id: str, revision: str | None) -> tuple[str, list[str]]:
    """The commit sha `revision` names now (the default branch if None), and the repo's
    file names at it: the one request that pins every later read."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo_id, revision=revision)
    names = sorted(s.rfilename for s in (info.siblings or []))
    return str(info.sha), names


def _weight_files(root: str, names: list[str], problems: list[InputProblem]) -> list[str] | None:
    """The shards the directory rules of io/checkpoint.py read, by repo file name."""
    from tadmerge.io.checkpoint import INDEX_NAME, _load_index, _rel_path_problem

    top = [n for n in names if "/" not in n]
    if INDEX_NAME in top:
        weight_map = _load_index(os.path.join(root, INDEX_NAME), problems)
        if weight_map is None:
            return None
        bad = [rel for rel in set(weight_map.values()) if _rel_path_problem(rel) is not None]
        for rel in sorted(bad):
            problems.append(InputProblem(os.path.join(root, INDEX_NAME), None, str(rel)))
        if bad:
            return None
        return sorted({os.path.normpath(rel) for rel in weight_map.values()})
    st = [n for n in top if n.endswith(".safetensors")]
    if "model.safetensors" in st:
        return ["model.safetensors"]
    if len(st) > 1:
        problems.append(
            InputProblem(
                root, None, f"several safetensors files and no {INDEX_NAME}: " + ", ".join(st)
            )
        )
        return None
    return st


def open_headers(
    source: str, repo_id: str, revision: str | None, problems: list[InputProblem]
) -> object:
    """A header-only Checkpoint of hub repo `repo_id` (its weights not downloaded:
    Checkpoint.fetched is False), WHOLE with the pinned commit when the repo is to be
    fetched whole, or None (problems recorded). Raises huggingface_hub's errors for
    io/checkpoint.py to word."""
    from huggingface_hub import HfApi, snapshot_download

    from tadmerge.io import lora
    from tadmerge.io.checkpoint import INDEX_NAME, Checkpoint, _extra_files

    sha, names = resolve_commit(repo_id, revision)
    if lora.is_adapter(names) or not any(n.endswith(".safetensors") for n in names):
        return (WHOLE, sha)
    local = os.path.abspath(snapshot_download(repo_id, revision=sha, allow_patterns=SIDE_PATTERNS))
    files = _weight_files(local, names, problems)
    if files is None:
        return None
    api = HfApi()
    tensors: dict[str, TensorEntry] = {}
    versions = []
    where: dict[str, str] = {}
    for rel in files:
        path = os.path.join(local, rel)
        if rel not in names:
            problems.append(InputProblem(path, None, f"named by {INDEX_NAME} but not in the repo"))
            continue
        meta = api.parse_safetensors_file_metadata(repo_id, rel, revision=sha)
        rows = []
        for name, info in sorted(meta.tensors.items()):
            start, end = (int(x) for x in info.data_offsets)
            shape = tuple(int(x) for x in info.shape)
            size = DTYPE_SIZE.get(info.dtype)
            numel = 1
            for d in shape:
                numel *= d
            if size is None or end - start != numel * size or min(shape, default=0) < 0:
                problems.append(
                    InputProblem(path, name, f"header entry {info.dtype} {list(shape)} invalid")
                )
                continue
            if name in where:
                problems.append(InputProblem(path, name, f"present in two shards: {where[name]}"))
                continue
            where[name] = path
            rows.append((name, info.dtype, shape, start, end))
            tensors[name] = TensorEntry(name, info.dtype, shape, path, start, end - start)
        versions.append((path, tensor_table_digest(rows)))
    if problems:
        return None
    allowed = [os.path.realpath(local), os.path.realpath(os.path.join(local, "..", "..", "blobs"))]
    extra = _extra_files(local, sorted(os.listdir(local)), allowed, problems)
    return Checkpoint(
        source=source,
        root=local,
        files=tuple(sorted(os.path.join(local, f) for f in files)),
        tensors=dict(sorted(tensors.items())),
        extra_files=tuple(extra),
        revision=sha,
        fetched=False,
        hub_versions=tuple(sorted(versions)),
    )


def fetch_weights(ck, repo_id: str, allow_pickle: bool):
    """Download the planned shards of header-only `ck` at its commit, one at a time,
    and open the snapshot as a local directory; every shard's tensor table must be
    the one planned (else InputError naming it)."""
    from huggingface_hub import hf_hub_download

    from tadmerge.io.checkpoint import _open_directory

    for i, path in enumerate(ck.files):
        rel = os.path.relpath(path, ck.root)
        log.info("downloading %s@%s %s (%d of %d)", repo_id, ck.revision, rel, i + 1, len(ck.files))
        hf_hub_download(repo_id, rel, revision=ck.revision)
    problems: list[InputProblem] = []
    allowed = [
        os.path.realpath(ck.root),
        os.path.realpath(os.path.join(ck.root, "..", "..", "blobs")),
    ]
    got = _open_directory(ck.source, ck.root, allowed, allow_pickle, ck.revision, problems)
    if got is None or problems:
        raise InputError(problems or [InputProblem(ck.root, None, "could not open download")])
    got = replace(got, hub_versions=local_versions(got.files, got.tensors))
    planned = dict(ck.hub_versions)
    for path, digest in got.hub_versions:
        if planned.get(path) != digest:
            problems.append(
                InputProblem(
                    path,
                    None,
                    f"downloaded at commit {ck.revision}, its header differs from the one "
                    "read through the hub's metadata API when planning",
                )
            )
    if set(planned) != {p for p, _ in got.hub_versions}:
        problems.append(InputProblem(ck.root, None, "downloaded shards are not the ones planned"))
    if problems:
        raise InputError(problems)
    return got
