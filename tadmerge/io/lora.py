"""PEFT LoRA adapters as inputs: a directory with adapter_config.json and
adapter_model.safetensors is accepted wherever a model path is.

The adapter is read as the fine-tune θ = base + ΔW, ΔW = scaling·B·A on its target
modules (scaling = lora_alpha/r, or lora_alpha/√r with use_rslora; alpha_pattern
and the rank of each A honoured; fan_in_fan_out and embedding adapters give
ΔW = (B·A)ᵀ) and θ = base elsewhere. Each target tensor is a LoraEntry: a
TensorEntry in float32 whose rows are made when they are read
(io/block_io.read_bytes), per row block: rows [r0, r1) of B (of Aᵀ when
transposed) times A, scaled and added to the base's rows widened to float32
(to the adapter's own copy of the layer where peft saved one: embeddings),
into the unit's own buffer; ΔW is never made whole. Every engine path reads it
as it reads a float32 fine-tune, so the task vector is θ − base in float32:
fl32(base + ΔW) − base, which is ΔW up to the float32 rounding of that sum (as
peft's merge_and_unload on a float32 model), and exact statistics (TADrop's
quantiles) are taken over it as over any task vector. Tensors outside the
target modules are the base's own entries: their task vector is exactly zero.

DoRA (use_dora: true), other PEFT types (IA3, prefix tuning, ...), LoRA biases
and modules_to_save are refused with an InputError naming them.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError, InputProblem
from .safetensors_format import TensorEntry, read_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_LORA = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|base_layer)"
)


@dataclass(frozen=True)
class Adapter:
    """What an adapter directory holds, before it is matched with a base."""

    config_path: str
    scaling_alpha: float
    rslora: bool
    fan_in_fan_out: bool
    alpha_pattern: dict
    # module -> {"A": entry, "B": entry, "embedding": bool}
    modules: dict = field(default_factory=dict)

    def scaling(self, module: str, r: int) -> float:
        alpha = self.scaling_alpha
        for key, value in self.alpha_pattern.items():  # peft's get_pattern_key
            if re.match(rf"(.*\.)?{key}$", module):
                alpha = float(value)
                break
        return alpha / math.sqrt(r) if self.rslora else alpha / r


@dataclass(frozen=True, slots=True)
class LoraEntry(TensorEntry):
    """A target tensor of an adapter: base + scaling·B·A, read per row block."""

    base: TensorEntry | None = None
    a: TensorEntry | None = None
    b: TensorEntry | None = None
    scale: float = 1.0
    transpose: bool = False

    def made_rows(self, row_start: int, row_end: int, out: np.ndarray | None) -> np.ndarray:
        """Rows [row_start, row_end) of θ in float32, as bytes (read_bytes' contract)."""
        import torch

        from .block_io import read_rows

        n = (row_end - row_start) * self.row_numel
        buf = np.empty(n * 4, np.uint8) if out is None else out[: n * 4]
        theta = torch.from_numpy(buf).view(torch.float32)
        if not n:
            return buf
        assert self.base is not None and self.a is not None and self.b is not None
        a = read_rows(self.a, 0, self.a.rows).float().view(self.a.shape)
        if self.transpose:  # ΔW = (B·A)ᵀ: rows r0..r1 are A[:, r0:r1]ᵀ · Bᵀ
            b = read_rows(self.b, 0, self.b.rows).float().view(self.b.shape)
            torch.mm(a[:, row_start:row_end].t(), b.t(), out=theta.view(row_end - row_start, -1))
        else:  # rows r0..r1 of B, times A
            b = read_rows(self.b, row_start, row_end).float().view(row_end - row_start, -1)
            torch.mm(b, a, out=theta.view(row_end - row_start, -1))
        theta.mul_(self.scale)
        # widened exactly by the promotion, added in float32: no float32 copy of it
        theta.add_(read_rows(self.base, row_start, row_end))
        return buf


def is_adapter(names: list[str]) -> bool:
    """A directory holding an adapter and no full weights (a model folder with a
    stray adapter_config.json is read as the model)."""
    full = {"model.safetensors", "model.safetensors.index.json"}
    return ADAPTER_CONFIG in names and ADAPTER_WEIGHTS in names and not full & set(names)


def open_adapter(root: str, problems: list[InputProblem]) -> tuple[Adapter, str] | None:
    """Read adapter_config.json and the adapter's header; None (problems recorded)
    when it is not a LoRA adapter this engine merges."""
    cfg_path = os.path.join(root, ADAPTER_CONFIG)
    try:
        with open(cfg_path, "rb") as fh:
            doc = json.loads(fh.read(4 * 2**20).decode("utf-8"))
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        problems.append(InputProblem(cfg_path, None, f"unreadable adapter config: {exc}"))
        return None
    kind = doc.get("peft_type")
    if kind != "LORA":
        problems.append(
            InputProblem(
                cfg_path,
                None,
                f"PEFT type {kind!r} is not supported (LoRA adapters are: peft_type LORA)",
            )
        )
        return None
    unsupported = []
    if doc.get("use_dora"):
        unsupported.append("use_dora: true (DoRA: its magnitude vector rescales W + ΔW)")
    if doc.get("modules_to_save"):
        unsupported.append(f"modules_to_save: {doc['modules_to_save']}")
    if doc.get("bias", "none") != "none":
        unsupported.append(f"bias: {doc['bias']!r}")
    if doc.get("lora_bias"):
        unsupported.append("lora_bias: true")
    if unsupported:
        problems.append(
            InputProblem(
                cfg_path,
                None,
                "this LoRA adapter cannot be merged as a task vector: " + "; ".join(unsupported),
            )
        )
        return None
    weights = os.path.join(root, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        problems.append(InputProblem(root, None, f"LoRA adapter without {ADAPTER_WEIGHTS}"))
        return None
    try:
        header = read_header(weights)
    except InputError as exc:
        problems.extend(exc.problems)
        return None
    modules: dict[str, dict] = {}
    for name, entry in header.tensors.items():
        m = _LORA.match(name.removeprefix(_PREFIX))
        if m is not None and m.group("kind") == "base_layer":
            # peft's save_embedding_layers: the layer's own weights (a resized
            # vocabulary); θ is made from them instead of the base's
            modules.setdefault(m.group("module"), {"embedding": False})["W"] = entry
            continue
        if m is None or len(entry.shape) != 2 or not entry.is_float:
            problems.append(
                InputProblem(weights, name, "not a LoRA A or B matrix (refused: what is it?)")
            )
            continue
        slot = modules.setdefault(m.group("module"), {"embedding": False})
        slot["embedding"] = slot["embedding"] or "embedding" in m.group("kind")
        slot[m.group("kind")[-1]] = entry
    for module, slot in modules.items():
        if "W" in slot and "A" not in slot and "B" not in slot:
            problems.append(InputProblem(weights, module, "saved layer without a LoRA A and B"))
        elif "A" not in slot or "B" not in slot:
            problems.append(
                InputProblem(weights, module, "LoRA module without both its A and B matrices")
            )
        elif slot["A"].shape[0] != slot["B"].shape[1]:
            problems.append(
                InputProblem(
                    weights,
                    module,
                    f"LoRA A {list(slot['A'].shape)} and B {list(slot['B'].shape)} "
                    "disagree in rank",
                )
            )
    try:
        alpha = float(doc.get("lora_alpha", 8))  # (peft's default)
        adapter = Adapter(
            config_path=cfg_path,
            scaling_alpha=alpha,
            rslora=bool(doc.get("use_rslora", False)),
            fan_in_fan_out=bool(doc.get("fan_in_fan_out", False)),
            alpha_pattern=dict(doc.get("alpha_pattern") or {}),
            modules=modules,
        )
    except (TypeError, ValueError) as exc:
        problems.append(InputProblem(cfg_path, None, f"bad lora_alpha / alpha_pattern: {exc}"))
        return None
    return adapter, weights


def resolve(adapter: Adapter, weights: str, base: dict[str, TensorEntry]) -> dict:
    """The adapter's tensors as a fine-tune of `base` (its entries by name): a
    LoraEntry per target module's weight, the base's own entry elsewhere."""
    problems: list[InputProblem] = []
    out = dict(base)
    for module, slot in sorted(adapter.modules.items()):
        target = f"{module}.weight"
        entry = base.get(target)
        if entry is None:
            problems.append(
                InputProblem(weights, module, f"LoRA target {target} is not a tensor of the base")
            )
            continue
        a, b = slot["A"], slot["B"]
        own = slot.get("W")
        if own is not None and (tuple(own.shape) != tuple(entry.shape) or not own.is_float):
            problems.append(
                InputProblem(
                    weights,
                    module,
                    f"the adapter's own {module} weights {list(own.shape)} do not fit the "
                    f"base's {list(entry.shape)} (another vocabulary?)",
                )
            )
            continue
        transpose = slot["embedding"] or adapter.fan_in_fan_out
        shape = (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])
        if tuple(entry.shape) != shape or not entry.is_float:
            problems.append(
                InputProblem(
                    weights,
                    module,
                    f"LoRA ΔW {list(shape)} does not fit the base's {target} "
                    f"{list(entry.shape)} {entry.dtype}",
                )
            )
            continue
        out[target] = LoraEntry(
            name=target,
            dtype="F32",
            shape=tuple(entry.shape),
            file=weights,
            offset=b.offset,
            nbytes=entry.numel * 4,
            identity=b.identity,
            base=entry if own is None else own,
            a=a,
            b=b,
            scale=adapter.scaling(module, a.shape[0]),
            transpose=transpose,
        )
    if problems:
        raise InputError(problems)
    return out
