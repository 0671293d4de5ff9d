"""Read an EMR output: unified delta, masks, rescalers, and the task models.

Task k's model is θ_k* = θ0 + fl32(λ_k) · (M_k ⊙ τ_uni), evaluated in float32
and cast to the base dtype, exactly as methods/emr.py's emr_task_block does; with
the default float32 delta this reproduces SPEC's θ_k* bit for bit. Tensors that
were not merged come from the base (copied tensors) or from task k itself
(excluded tensors, stored per task).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from ..errors import InputError, InputProblem
from ..io.block_io import read_rows
from ..io.checkpoint import (
    HEAD_NAME,
    Checkpoint,
    _parse_repo_id,
    open_checkpoint,
    with_tied_head,
)
from ..io.model_files import EMR_NAME
from ..io.safetensors_format import TensorEntry
from ..methods.emr import emr_task_block
from .pin import check_base
from .store import MaskStore


@dataclass
class EmrOutput:
    root: str
    doc: dict
    delta: Checkpoint  # τ_uni tensors
    base: Checkpoint
    masks: MaskStore

    @property
    def tasks(self) -> list[str]:
        return list(self.doc["tasks"])

    def rescaler(self, task: str) -> float:
        return float(self.doc["rescalers"][task])

    def task_index(self, task: str) -> int:
        if task not in self.doc["tasks"]:
            raise InputError(
                InputProblem(self.root, None, f"no task {task!r}; tasks: {', '.join(self.tasks)}")
            )
        return self.doc["tasks"].index(task)

    def excluded(self, task: str) -> Checkpoint | None:
        files = self.doc.get("excluded_per_task", {}).get(task)
        if not files:
            return None
        return open_checkpoint(os.path.join(self.root, "tasks", task))

    def tensor_names(self) -> list[str]:
        return sorted(self.doc["tensors"])

    def _rows(self, entry: TensorEntry, r0: int, r1: int) -> torch.Tensor:
        return read_rows(entry, r0, r1)

    def task_rows(
        self, task: str, name: str, r0: int, r1: int, excluded: Checkpoint | None = None
    ) -> torch.Tensor:
        """Rows [r0, r1) of task `task`'s tensor `name`, flat, in the base dtype."""
        info = self.doc["tensors"][name]
        base_entry = self.base.tensors[name]
        if info["kind"] == "exclude":
            ck = excluded if excluded is not None else self.excluded(task)
            if ck is None:
                return self._rows(base_entry, r0, r1)
            return self._rows(ck.tensors[name], r0, r1)
        if info["kind"] != "merge":
            return self._rows(base_entry, r0, r1)
        k = self.task_index(task)
        base = self._rows(base_entry, r0, r1).to(torch.float32)
        tau = self._rows(self.delta.tensors[name], r0, r1).to(torch.float32)
        tp_index = int(self.masks_key(name)[1:])
        mask = self.masks.read(tp_index, tuple(info["shape"]), info["block_rows"], k, r0, r1)
        out = emr_task_block(base, tau, mask, self.rescaler(task))
        return out.to(base_entry.torch_dtype)

    def masks_key(self, name: str) -> str:
        import zarr

        group = zarr.open_group(self.masks.root, mode="r")
        return group.attrs["tensors"][name]["key"]

    def task_tensor(self, task: str, name: str) -> torch.Tensor:
        shape = tuple(self.doc["tensors"][name]["shape"])
        rows = shape[0] if shape else 1
        return self.task_rows(task, name, 0, rows).view(shape)


def open_emr(path: str, *, verify_base: bool = False) -> EmrOutput:
    """Open an EMR output written by `tadmerge merge` with merge.method: emr.

    The base is the one emr.json pins (emr/pin.py): a Hub base is opened at the
    pinned revision, never the latest; every base file's size and header digest are
    checked, and with `verify_base` its whole-file SHA-256 too (a read of the whole
    base). A changed base raises BaseChangedError (an InputError: exit 3) naming the
    file and what differs. An emr.json of an older tadmerge pins nothing: a warning
    is logged and the base is used as it is.
    """
    doc_path = os.path.join(path, EMR_NAME)
    if not os.path.isfile(doc_path):
        raise InputError(
            InputProblem(path, None, f"not an EMR output (no {EMR_NAME}); was it merged with emr?")
        )
    try:
        with open(doc_path, "rb") as f:
            doc = json.loads(f.read(64 * 2**20))
        pinned = doc["base"]
        root, source = pinned["root"], pinned["source"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(InputProblem(doc_path, None, f"unreadable emr.json: {e}")) from None
    base = open_checkpoint(_pinned_source(root, source, pinned.get("revision")))
    check_base(path, pinned, base, full=verify_base)
    if HEAD_NAME in doc.get("tensors", {}):  # a tied base merged with untied models
        base = with_tied_head(base) or base
    delta = open_checkpoint(path)
    return EmrOutput(path, doc, delta, base, MaskStore(os.path.join(path, "masks.zarr")))


def _pinned_source(root: str, source: str, revision: str | None) -> str:
    """Where to open the base: its directory when it is still there (a Hub snapshot's
    directory is named by its commit), else the source, a repo id at the pinned
    revision."""
    if os.path.isdir(root):
        return root
    repo = _parse_repo_id(source)
    if repo is not None and revision:
        return f"{repo[0]}@{revision}"
    return source


class LazyTaskTensors(Mapping):
    """A read-only mapping name -> tensor of one task's model, built on access."""

    def __init__(self, emr: EmrOutput, task: str):
        self.emr = emr
        self.task = task
        emr.task_index(task)
        self._names = emr.tensor_names()

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.emr.doc["tensors"]:
            raise KeyError(name)
        return self.emr.task_tensor(self.task, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def task_state_dict(path: str, task: str, *, lazy: bool = False, verify_base: bool | None = None):
    """Task `task`'s full state dict (or a lazy mapping) without writing files.

    `verify_base` (default: True when eager, which reads the whole base anyway;
    False when lazy, which checks the base's sizes and headers only): also check
    the SHA-256 of every base file against emr.json's pins.
    """
    emr = open_emr(path, verify_base=not lazy if verify_base is None else verify_base)
    mapping = LazyTaskTensors(emr, task)
    return mapping if lazy else {n: mapping[n] for n in mapping}


# ------------------------------------------------------------------------------------
# switching tasks on a loaded model, in place
# ------------------------------------------------------------------------------------


class TaskSwitcher:
    """Apply or remove a task's modulators on a loaded torch model in place.

    The model must hold the base weights. `apply(task)` turns each merged
    parameter into θ0 + λ_k M_k ⊙ τ_uni (and swaps in the task's excluded
    tensors); `remove()` restores the base bit for bit (the base values are kept
    on the CPU for the merged tensors only, so switching never reloads a file).
    """

    def __init__(self, model: torch.nn.Module, path: str, *, verify_base: bool = False):
        # the base's sizes and headers are checked; its whole content with verify_base
        self.emr = open_emr(path, verify_base=verify_base)
        self.model = model
        self.params = dict(model.state_dict(keep_vars=True))
        self.active: str | None = None
        self._saved: dict[str, torch.Tensor] = {}

    def _touched(self) -> list[str]:
        return [n for n, i in self.emr.doc["tensors"].items() if i["kind"] in ("merge", "exclude")]

    def apply(self, task: str) -> None:
        if self.active is not None:
            self.remove()
        self.emr.task_index(task)
        with torch.no_grad():
            for name in self._touched():
                if name not in self.params:
                    continue
                p = self.params[name]
                self._saved[name] = p.detach().to("cpu", copy=True)
                p.copy_(self.emr.task_tensor(task, name).view(p.shape).to(p.device, p.dtype))
        self.active = task

    def remove(self) -> None:
        with torch.no_grad():
            for name, saved in self._saved.items():
                self.params[name].copy_(saved.to(self.params[name].device))
        self._saved.clear()
        self.active = None
