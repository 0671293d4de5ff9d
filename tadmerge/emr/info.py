"""`tadmerge info OUT`: what a merge output is; for EMR, what it holds and what it costs
on disk."""

from __future__ import annotations

import json
import os

from ..errors import InputError, InputProblem
from ..io.model_files import EMR_NAME, REPORT_NAME
from ..io.publish import MANIFEST_NAME
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
    """`tadmerge info OUT`: an EMR output (tasks, rescalers, sizes), or any other merge
    output (method, inputs, tensors, sizes) read from its merge_report.json and
    manifest.json; both with the drop rates per task, by name."""
    if os.path.exists(os.path.join(path, EMR_NAME)):
        _print_emr(path)
    else:
        _print_merge(path)


def _print_emr(path: str) -> None:
    info = emr_info(path)
    b = info["bytes"]
    report = _read_json(os.path.join(path, REPORT_NAME))
    print(f"EMR output {path}")
    if report is not None:
        print(f"  method: {_describe_method(report.get('config') or {})}")
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
    if report is not None:
        _print_drop_rates(report)


def merge_info(path: str) -> dict:
    """What a (non-EMR) merge output is, from its merge_report.json and manifest.json."""
    report = _read_json(os.path.join(path, REPORT_NAME))
    manifest = _read_json(os.path.join(path, MANIFEST_NAME))
    if report is None and manifest is None:
        raise InputError(
            InputProblem(
                path,
                None,
                f"not a tadmerge output: no {REPORT_NAME} nor {MANIFEST_NAME} here "
                "(`tadmerge info` takes the output.path of a merge)",
            )
        )
    report = report or {}
    cfg = report.get("config") or {}
    tensors = report.get("tensors") or {}
    kinds: dict[str, int] = {}
    for t in tensors.values():
        kinds[t.get("kind", "?")] = kinds.get(t.get("kind", "?"), 0) + 1
    files = [f for f in (manifest or {}).get("files", []) if isinstance(f, dict)]
    shards = [f for f in files if str(f.get("path", "")).endswith(".safetensors")]
    return {
        "method": _describe_method(cfg),
        "base": cfg.get("base"),
        "models": [
            (m.get("name"), m.get("weight"), m.get("path")) for m in cfg.get("models") or []
        ],
        "tensors": len(tensors),
        "tensor_kinds": kinds,
        "output_dtype": (cfg.get("output") or {}).get("dtype"),
        "shards": len(shards),
        "shard_bytes": sum(int(f.get("size") or 0) for f in shards),
        "files": len(files),
        "input_bytes": report.get("input_bytes"),
        "total_s": (report.get("timings") or {}).get("total_s"),
        "peak_rss_bytes": report.get("peak_rss_bytes"),
        "version": report.get("tadmerge_version"),
        "report": report,
    }


def _print_merge(path: str) -> None:
    info = merge_info(path)
    mib = 2**20
    print(f"merge output {path}")
    print(f"  method: {info['method']}")
    if info["base"]:
        print(f"  base: {info['base']}")
    if info["models"]:
        print(f"  models ({len(info['models'])}):")
        for name, weight, src in info["models"]:
            print(f"    {str(name):24s} weight {weight}  {src}")
    if info["tensors"]:
        words = {"merge": "merged", "copy": "copied", "exclude": "excluded"}
        kinds = ", ".join(
            f"{n} {words.get(k, k)}"
            for k, n in sorted(info["tensor_kinds"].items(), key=_kind_order)
        )
        print(f"  tensors: {info['tensors']} ({kinds})")
    dtype = info["output_dtype"]
    print(
        f"  output: {info['shard_bytes'] / mib:.2f} MiB in {info['shards']} shard(s)"
        + (", dtype: the base's (auto)" if dtype == "auto" else f", dtype {dtype}")
        + (f"; inputs {info['input_bytes'] / mib:.2f} MiB" if info["input_bytes"] else "")
    )
    print(f"  files: {info['files']} in {MANIFEST_NAME} (check them: tadmerge verify {path})")
    if info["total_s"] is not None:
        rss = info["peak_rss_bytes"]
        print(
            f"  merged in {info['total_s']:.1f}s"
            + (f", peak RSS {rss / mib:.0f} MiB" if rss else "")
            + (f", tadmerge {info['version']}" if info["version"] else "")
        )
    if info["report"]:
        _print_drop_rates(info["report"])


def _kind_order(item: tuple[str, int]) -> int:
    return {"merge": 0, "copy": 1, "exclude": 2}.get(item[0], 3)


def _describe_method(cfg: dict) -> str:
    from .. import methods

    def with_params(section: dict, table: dict, default: str) -> str:
        name = section.get("method", default)
        m = table.get(name)
        params = [
            f"{p.name} {section[p.name]}" for p in (m.params if m else ()) if p.name in section
        ]
        return name + (f" ({', '.join(params)})" if params else "")

    merge = with_params(cfg.get("merge") or {}, methods.combiners(), "?")
    sp = cfg.get("sparsify") or {}
    if sp.get("method", "none") == "none":
        return f"{merge}, no sparsifier"
    return f"{merge} + {with_params(sp, methods.sparsifiers(), 'none')}"


MAX_TASK_COLUMNS = 8
MAX_TENSOR_ROWS = 40


def _print_drop_rates(report: dict) -> None:
    """Per task (by name): the size-weighted drop and its spread over tensors; then a
    table of the first tensors with one column per task, headed by the task's name."""
    from ..report.plots import drop_rates, summarize

    sp = (report.get("config") or {}).get("sparsify") or {}
    if sp.get("method", "none") == "none":
        print("  drop rates: none (no sparsifier: every entry of every task vector kept)")
        return
    dr = drop_rates(report)
    if not dr.tasks:
        return
    summary = summarize(report)["tasks"]
    width = max(len(t) for t in dr.tasks)
    print("  drop rate per task (size-weighted over all merged entries; per tensor min/mean/max):")
    for t in dr.tasks:
        s = summary[t]
        print(f"    {t:{width}s} {s['overall_drop']:6.1%}   per tensor {s['min']:.3f} / "
              f"{s['mean_tensor_drop']:.3f} / {s['max']:.3f}")  # fmt: skip
    shown = dr.tasks[:MAX_TASK_COLUMNS]
    cols = [max(6, min(12, len(t))) for t in shown]
    head = " ".join(f"{t[:w]:>{w}s}" for t, w in zip(shown, cols, strict=True))
    more = (
        f"  (+{len(dr.tasks) - len(shown)} tasks in {REPORT_NAME})"
        if len(dr.tasks) > len(shown)
        else ""
    )
    names = dr.names[:MAX_TENSOR_ROWS]
    name_w = min(56, max(len(n) for n in names))
    print(f"  drop rate per tensor ({len(dr.names)} merged tensors, model order):{more}")
    print(f"    {'tensor':{name_w}s} {head}")
    for n in names:
        vals = " ".join(
            f"{dr.rate[t][n]:{w}.3f}" if n in dr.rate[t] else f"{'-':>{w}s}"
            for t, w in zip(shown, cols, strict=True)
        )
        print(f"    {n[:name_w]:{name_w}s} {vals}")
    if len(dr.names) > len(names):
        print(
            f"    ... {len(dr.names) - len(names)} more in {REPORT_NAME} (figures: tadmerge report)"
        )


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise InputError(InputProblem(path, None, f"unreadable: {e}")) from None
    return doc if isinstance(doc, dict) else None
