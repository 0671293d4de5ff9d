"""The resume state: the staging directory's `.tadmerge/` folder.

It holds what a killed merge needs to resume to the same bytes: the plan
fingerprint (written, and made durable, before any file it vouches for), the
input versions the staging is made from (`inputs.json`, run/inputs.py), the
resolved statistics (`stats.json`) and the resume log of finished units
(`units.jsonl`, run/unit_log.py). The folder is left out of the manifest,
travels with the rename into place and is removed from the output right after
(io/publish.py), so a staging directory never lacks its fingerprint.
"""

from __future__ import annotations

import json
import logging
import os

from ..cluster.worker import UnitRecord
from ..errors import MergeRuntimeError, OutputError
from ..io.publish import STATE_DIR, fsync_dir
from .files import atomic_write, writing
from .unit_log import UnitLog, read_records

log = logging.getLogger("tadmerge")


class RunState:
    """The resume state inside the staging directory."""

    def __init__(self, staging: str):
        self.dir = os.path.join(staging, STATE_DIR)
        with writing(self.dir):
            os.makedirs(self.dir, exist_ok=True)
        self.units_path = os.path.join(self.dir, "units.jsonl")
        self.log = UnitLog(self.units_path, staging)

    def check_or_write_fingerprint(self, fingerprint: str, resume: bool) -> None:
        path = os.path.join(self.dir, "fingerprint")
        staging = os.path.dirname(self.dir)
        if resume and not os.path.exists(path) and set(os.listdir(staging)) - {STATE_DIR}:
            # files no fingerprint vouches for (a staging directory that an older
            # tadmerge left mid-publish): they may belong to another plan
            raise OutputError(
                f"--resume: {staging} holds files but no plan fingerprint, so they cannot "
                "be matched to this merge; remove it and rerun without --resume"
            )
        if resume and os.path.exists(path):
            with open(path) as f:
                old = f.read().strip()
            if old != fingerprint:
                raise OutputError(
                    "--resume: the inputs or the config changed since the interrupted merge "
                    f"(plan {old[:12]} != {fingerprint[:12]}); remove the staging directory "
                    "or restore them"
                )
            return
        atomic_write(path, fingerprint.encode())
        with writing(self.dir):  # durable before any file it vouches for exists
            fsync_dir(self.dir)

    def load_stats(self) -> dict | None:
        path = os.path.join(self.dir, "stats.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            doc = json.load(f)
        if not doc:  # a merge without statistics: no engine import
            return {}
        from ..cluster.stats import resolved_from_json

        return resolved_from_json(doc)

    def save_stats(self, resolved: dict) -> None:
        doc = b"{}"
        if resolved:
            from ..cluster.stats import resolved_to_json

            doc = json.dumps(resolved_to_json(resolved)).encode()
        atomic_write(os.path.join(self.dir, "stats.json"), doc)

    def finished(self) -> dict[int, UnitRecord]:
        """The units the log says finished (run/unit_log.check_finished reads their
        bytes back before any is reused)."""
        return read_records(self.units_path)

    def append(self, rec: UnitRecord) -> None:
        """Log a finished unit: batched, written once its data is durable (UnitLog)."""
        self.log.add(rec)

    def flush(self) -> None:
        self.log.flush()

    def close(self, flush: bool) -> None:
        """Stop logging; with `flush`, first log what finished (best effort: the
        merge is failing already, and an unlogged unit is only redone)."""
        if flush:
            try:
                self.log.flush()
            except MergeRuntimeError as exc:
                log.warning("%s", exc)
        self.log.close()
