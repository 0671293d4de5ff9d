"""`tadmerge info OUT`: what an EMR output holds and what it costs on disk."""

from __future__ import annotations

import json
import os

from .artifacts import open_emr


def _dir_bytes(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total


def emr_info(path: str) -> dict:
    emr = open_emr(path)
    delta_bytes = sum(os.path.getsize(f) for f in emr.delta.files)
    mask_bytes = _dir_bytes(emr.masks.root)
    excluded_bytes = _dir_bytes(os.path.join(path, "tasks"))
    merged_elems = sum(
        _numel(i["shape"]) for i in emr.doc["tensors"].values() if i["kind"] == "merge"
    )
    k = len(emr.tasks)
    payload = _mask_payload(emr.masks.root)
    separate = k * emr.base.total_bytes
    total = delta_bytes + mask_bytes + excluded_bytes
    report_path = os.path.join(path, "merge_report.json")
    drop = {}
    if os.path.exists(report_path):
        with open(report_path) as f:
            rep = json.load(f)
        for name, t in rep.get("tensors", {}).items():
            if t.get("kind") == "merge":
                drop[name] = {task: v.get("drop_rate") for task, v in t["tasks"].items()}
    return {
        "tasks": emr.tasks,
        "rescalers": emr.doc["rescalers"],
        "base": emr.doc["base"],
        "delta_dtype": emr.doc["delta"]["dtype"],
        "bytes": {
            "unified_delta": delta_bytes,
            "masks": mask_bytes,
            "excluded_per_task": excluded_bytes,
            "total": total,
            "k_separate_checkpoints": separate,
        },
        "mask_bytes_per_element_per_task": mask_bytes / max(1, merged_elems * k),
        "mask_payload_bytes": payload,
        "mask_payload_bytes_per_element_per_task": payload / max(1, merged_elems * k),
        "drop_rates": drop,
    }


def _mask_payload(root: str) -> int:
    """Bytes of packed bits written: 1 bit per element, each canonical block padded
    to a whole byte (before zarr's compression and metadata; the unused tail of a
    tensor's last chunk is not counted: it holds no bits and compresses away)."""
    import zarr

    group = zarr.open_group(root, mode="r")
    k = len(group.attrs["tasks"])
    total = 0
    for info in group.attrs["tensors"].values():
        shape = info["shape"]
        rows = shape[0] if shape else 1
        row_numel = _numel(shape[1:]) if len(shape) > 1 else 1
        br = info["block_rows"]
        full, last = divmod(rows, br)
        total += full * ((br * row_numel + 7) // 8) + (last * row_numel + 7) // 8
    return total * k


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def print_info(path: str) -> None:
    info = emr_info(path)
    b = info["bytes"]
    print(f"EMR output {path}")
    print(f"  base: {info['base']['source']} (revision {info['base'].get('revision') or '-'})")
    print(f"  tasks ({len(info['tasks'])}):")
    for t in info["tasks"]:
        print(f"    {t:24s} rescaler {info['rescalers'][t]:.6f}")
    mib = 2**20
    print(f"  unified delta ({info['delta_dtype']}): {b['unified_delta'] / mib:.2f} MiB")
    per_elem = info["mask_bytes_per_element_per_task"]
    payload = info["mask_payload_bytes_per_element_per_task"]
    print(
        f"  masks: {b['masks'] / mib:.2f} MiB on disk ({per_elem:.4f} bytes per element per "
        f"task; packed bits {payload:.4f} before compression and metadata)"
    )
    if b["excluded_per_task"]:
        print(f"  excluded tensors kept per task: {b['excluded_per_task'] / mib:.2f} MiB")
    print(f"  total: {b['total'] / mib:.2f} MiB vs {b['k_separate_checkpoints'] / mib:.2f} MiB "
          f"for {len(info['tasks'])} separate checkpoints "
          f"({b['total'] / max(1, b['k_separate_checkpoints']):.1%})")  # fmt: skip
    if info["drop_rates"]:
        print("  drop rate per tensor (first tasks):")
        for name, rates in list(info["drop_rates"].items())[:40]:
            vals = " ".join(f"{r:.3f}" if r is not None else "-" for r in rates.values())
            print(f"    {name:48s} {vals}")
        if len(info["drop_rates"]) > 40:
            print(f"    ... {len(info['drop_rates']) - 40} more in merge_report.json")
