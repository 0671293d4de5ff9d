"""Which versions of the inputs a merge reads, and what it does when they change.

The plan records every input file's version (io/identity.py: inode, size,
mtime, ctime and header digest; a Hub file by its revision), and the plan
fingerprint covers them. This module holds the three places a run compares
them:

- `--resume` (`record_inputs`, `refuse_changed_inputs`): the staging's
  `.tadmerge/inputs.json` holds the versions its finished work was read from; a
  resume from other versions is refused, naming each file and what changed
  (the fingerprint alone would only say "changed").
- before publishing (`check_inputs_unchanged`): every input is re-stat'ed and
  its header re-read, so the output comes from one version of every input.
- `--if-changed` (`changed_since`): the published output's `merge_report.json`
  records what it was made from (`inputs_record`); an output made from these
  versions and this config is up to date, and nothing is merged.
"""

from __future__ import annotations

import hashlib
import json
import os

from ..errors import InputChangedError, OutputError, printable
from ..io.block_io import changed_problem
from ..io.identity import recheck
from ..io.model_files import REPORT_NAME
from ..io.publish import MANIFEST_NAME, read_manifest
from ..planners.plan import Plan, input_versions
from .files import atomic_write

INPUTS_NAME = "inputs.json"  # in STATE_DIR: the input versions the staging was made from


def record_inputs(state_dir: str, plan: Plan) -> None:
    """Record the input versions this staging is made from (once)."""
    path = os.path.join(state_dir, INPUTS_NAME)
    if not os.path.exists(path):
        atomic_write(path, json.dumps(input_versions(plan), sort_keys=True).encode())


def refuse_changed_inputs(state_dir: str, plan: Plan, staging: str) -> None:
    """--resume: refuse, naming them, inputs that are not the versions the
    interrupted merge read (the fingerprint alone would only say "changed")."""
    try:
        with open(os.path.join(state_dir, INPUTS_NAME)) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return  # none recorded (an older staging): the fingerprint decides
    if not isinstance(old, dict):
        return
    changed = _changes(old, input_versions(plan), 500, "not an input of the interrupted merge")
    if changed:
        raise OutputError(
            "--resume: the inputs changed since the interrupted merge: "
            + "; ".join(changed[:20])
            + (f"; and {len(changed) - 20} more" if len(changed) > 20 else "")
            + f". Its finished work was read from the old versions and cannot be reused "
            f"(even a file restored to its old bytes and mtime has another ctime): remove "
            f"the staging directory {staging} and rerun"
        )


def check_inputs_unchanged(plan: Plan) -> None:
    """Re-stat every input and re-read its header (io/identity.recheck): an input
    that is not the version planned with fails the merge, naming every such file,
    before anything is published."""
    problems = [
        changed_problem(path, None, why)
        for path, ident in sorted(plan.identities.items())
        if (why := recheck(ident)) is not None
    ]
    if problems:
        raise InputChangedError(problems)


def inputs_record(plan: Plan) -> dict:
    """What the output is made from, in its merge_report.json (covered by the manifest):
    the plan fingerprint (the config, every input file's version: local files by inode,
    size, mtime, ctime and header digest, Hub files by commit; the layout; the tadmerge
    version) and, per input, its source, revision (a Hub commit) and file versions.
    `--if-changed` compares it; people read which inputs and revisions made an output."""
    files = input_versions(plan)
    return {
        "plan_fingerprint": plan.fingerprint,
        "checkpoints": [
            {
                "source": ck.source,
                "revision": ck.revision,
                "files": {
                    k: v
                    for k, v in files.items()
                    if k in ck.files or (ck.revision and k.startswith(f"{ck.source}@"))
                },
            }
            for ck in plan.inputs
        ],
        "extra_files": _extra_versions(plan),
    }


def changed_since(plan: Plan) -> str | None:
    """--if-changed: None when the published output at output.path was made from these
    inputs and this config (its merge_report.json, checked against its manifest, records
    the same fingerprint and extra files), else why a merge is needed. Reads headers
    (done by the plan already) and the output's manifest and report, no tensor data."""
    out = plan.config.output.path
    if not os.path.lexists(out):
        return f"no output at {out} yet"
    doc = read_manifest(out)
    if doc is None:
        return f"{out} has no tadmerge {MANIFEST_NAME}"
    entry = next(
        (e for e in doc["files"] if isinstance(e, dict) and e.get("path") == REPORT_NAME), None
    )
    path = os.path.join(out, REPORT_NAME)
    try:
        with open(path, "rb") as f:
            data = f.read(64 * 2**20)
        old = json.loads(data)
    except (OSError, ValueError):
        return f"{path} is missing or unreadable"
    if entry is None or entry.get("sha256") != hashlib.sha256(data).hexdigest():
        return f"{path} does not match the output's {MANIFEST_NAME}"
    rec = old.get("inputs") if isinstance(old, dict) else None
    if not isinstance(rec, dict) or old.get("plan_fingerprint") != plan.fingerprint:
        return _what_differs(rec, plan)
    if rec.get("extra_files") != _extra_versions(plan):
        return "a file copied beside the weights (config, tokenizer) changed"
    return None


def _what_differs(rec: dict | None, plan: Plan) -> str:
    """A short why for a changed fingerprint: the input files that changed, else the
    config or tadmerge."""
    if not isinstance(rec, dict) or not isinstance(rec.get("checkpoints"), list):
        return "the output does not record its inputs (made by an older tadmerge)"
    old: dict = {}
    for ck in rec["checkpoints"]:
        if isinstance(ck, dict) and isinstance(ck.get("files"), dict):
            old.update(ck["files"])
    changed = _changes(old, input_versions(plan), 200, "a new input")
    if changed:
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        return f"{len(changed)} input file(s) changed: " + "; ".join(changed[:5]) + more
    return "the config or the tadmerge version changed"


def _changes(old: dict, now: dict, width: int, new: str) -> list[str]:
    """'file (what changed)' for each file whose recorded version is not its version
    now, in file order; `new` says what a file that `old` lacks is."""
    return [
        f"{printable(k, width)} ({_what_changed(old.get(k), now.get(k), new)})"
        for k in sorted(set(old) | set(now))
        if old.get(k) != now.get(k)
    ]


def _what_changed(a: dict | None, b: dict | None, new: str) -> str:
    if a is None:
        return new
    if b is None:
        return "no longer an input"
    if a.get("ino") != b.get("ino"):
        return "replaced by another file"
    if a.get("size") != b.get("size"):
        return f"size {a.get('size')} -> {b.get('size')} bytes"
    if a.get("header_sha256") != b.get("header_sha256"):
        return "its header changed"
    if a.get("mtime_ns") != b.get("mtime_ns"):
        return "modified: mtime changed"
    return "rewritten in place or its metadata changed: ctime moved, size and mtime kept"


def _extra_versions(plan: Plan) -> dict[str, dict]:
    """The files copied into the output beside the weights (config.json, tokenizer):
    inode, size, mtime and ctime, which no rewrite keeps (io/identity.py)."""
    out = {}
    for src in plan.inputs[0].extra_files:
        st = os.stat(src)
        out[src] = {
            "ino": st.st_ino,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns,
        }
    return out
