"""Writing the staging directory's own files: an OSError names the file.

Every file the run writes beside the units' bytes (the resume state, the resume
log, the index, side files, config, report, emr.json) goes through `writing`:
a full disk or a lost mount fails the merge with a MergeRuntimeError (exit 4)
that names the file and keeps the staging directory for `--resume`.
"""

from __future__ import annotations

import json
import math
import os

from ..errors import MergeRuntimeError


class writing:
    """Turn an OSError while `action` `path` into a MergeRuntimeError naming it."""

    def __init__(self, path: str, action: str = "writing"):
        self.path = path
        self.action = action

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ, exc, tb) -> bool:
        if isinstance(exc, OSError):
            raise MergeRuntimeError(
                f"{self.action} {self.path} failed: {exc.strerror or exc}; the staging "
                "directory is kept: fix the cause and rerun with --resume"
            ) from exc
        return False


def atomic_write(path: str, data: bytes) -> None:
    """`data` durable under `path`, or the old file (a temporary renamed over it)."""
    tmp = path + ".tmp"
    with writing(path):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def write_json(path: str, doc: dict) -> None:
    """A report-like JSON document, indented; non-finite floats as null."""
    with writing(path), open(path, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False, default=_json_default)
        f.write("\n")


def dumps_indented(obj, level: int = 0) -> str:
    """The text json.dumps(obj, indent=1) gives at nesting depth `level` (dicts with
    str keys, lists, tuples and JSON scalars), made with the C encoder for every
    scalar: json's own indented encoder is pure Python, ~5x slower, which for the
    report of a million tensors is minutes."""
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        pad = "\n" + " " * (level + 1)
        inner = ("," + pad).join(
            _scalar(k) + ": " + dumps_indented(v, level + 1) for k, v in obj.items()
        )
        return "{" + pad + inner + "\n" + " " * level + "}"
    if isinstance(obj, (list, tuple)):
        if not obj:
            return "[]"
        pad = "\n" + " " * (level + 1)
        return (
            "["
            + pad
            + ("," + pad).join(dumps_indented(v, level + 1) for v in obj)
            + ("\n" + " " * level + "]")
        )
    return _scalar(obj)


def _scalar(v) -> str:
    """json.dumps(v) of a scalar, without making an encoder per call."""
    t = type(v)
    if t is str:
        return _encode_str(v)
    if t is float:
        if math.isfinite(v):
            return repr(v)
        return "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")
    if t is int:
        return int.__repr__(v)
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    return _ENCODER.encode(v)


def _json_default(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    raise TypeError(type(v))


_ENCODER = json.JSONEncoder(default=_json_default)
_encode_str = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]
