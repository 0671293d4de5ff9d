"""mergekit's `slices` (layer stacking) translated into the native `slices`.

- `passthrough`: each slice has one source; its models become the native
  models (named as the other translations name them), `base_model`, if given,
  the base (config.json comes from it, as in mergekit), else the first slice's
  model. Nothing is cast: `dtype` is not applied (the sources' bytes are copied).
- another method: every slice lists the same models (and, for the task
  arithmetic methods, `base_model`), each model's parameters the same in every
  slice; the models are translated as the `models:` form of the same method
  would be (frontends/mergekit.translate), and each native slice lists `base` and
  every model with its layer range.

What does not fit (per-slice parameters or base models, a model's parameters
that change between slices, `residual_weight`, passthrough's `scale`) is named
in one ConfigError, with what translate() finds, before anything is read.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError
from ..schema import show
from .mergekit import MERGEKIT_VERSION, _model_ref, _Problems

Translate = Callable[[dict, Path], tuple[dict, list[str]]]


def _slices(raw: dict, problems: _Problems) -> list[list[tuple[str, list[int], dict]]]:
    """Each slice's sources as (model, [start, end], parameters)."""
    slices = raw.get("slices")
    if not isinstance(slices, list) or not slices:
        problems.add("slices", "expected a non-empty list of {sources: [{model, layer_range}]}")
        return []
    out = []
    for i, sl in enumerate(slices):
        where = f"slices[{i}]"
        if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list) or not sl["sources"]:
            problems.add(where, "expected {sources: [{model, layer_range}, ...]}")
            continue
        for key in ("parameters", "base_model", "residual_weight"):
            if sl.get(key) not in (None, {}):
                problems.add(f"{where}.{key}", "per-slice settings are not supported yet")
        srcs = []
        for j, s in enumerate(sl["sources"]):
            at = f"{where}.sources[{j}]"
            if not isinstance(s, dict) or "model" not in s or "layer_range" not in s:
                problems.add(at, "expected {model, layer_range, parameters}")
                continue
            ref = _model_ref(s["model"], f"{at}.model", problems)
            lr = s["layer_range"]
            if (
                not isinstance(lr, list)
                or len(lr) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) for v in lr)
            ):
                problems.add(f"{at}.layer_range", f"expected [start, end], got {show(lr)}")
                continue
            params = s.get("parameters") or {}
            if not isinstance(params, dict):
                problems.add(f"{at}.parameters", "expected a mapping")
                params = {}
            if ref is not None:
                srcs.append((ref, list(lr), params))
        out.append(srcs)
    return out


def translate_slices(raw: dict, cwd: Path, translate: Translate) -> tuple[dict, list[str]]:
    """The native config of a mergekit config with `slices` (or passthrough)."""
    from ..config import _resolve_path

    problems = _Problems()
    method = raw.get("merge_method")
    if "slices" not in raw:
        problems.add("slices", "passthrough stacks layer ranges: give slices (as mergekit)")
        _raise(problems)
    if raw.get("models"):
        problems.add("models", "mergekit takes models or slices, not both")
    slices = _slices(raw, problems)
    refs: list[str] = []
    for sl in slices:
        for ref, _, _ in sl:
            if ref not in refs:
                refs.append(ref)
    if len(slices) > 1:
        given = [("parameters", raw.get("parameters"))] + [
            (f"slices[{i}].sources[{j}].parameters", params)
            for i, sl in enumerate(slices)
            for j, (_, _, params) in enumerate(sl)
        ]
        for at, params in given:
            for key, setting in params.items() if isinstance(params, dict) else ():
                if _gradient(setting):
                    problems.add(
                        f"{at}.{key}",
                        "a layer gradient with several slices is not supported yet (mergekit "
                        "interpolates it within each slice; tadmerge over the output's layers)",
                    )
    base = raw.get("base_model")
    base = base if isinstance(base, str) else None
    flat = {k: v for k, v in raw.items() if k not in ("slices", "models")}
    if method == "passthrough":
        for i, sl in enumerate(slices):
            if len(sl) != 1:
                problems.add(f"slices[{i}].sources", f"passthrough takes one source, got {len(sl)}")
            for j, (_, _, params) in enumerate(sl):
                if "scale" in params:
                    problems.add(f"slices[{i}].sources[{j}].parameters.scale", "not supported yet")
        if "scale" in (raw.get("parameters") or {}):
            problems.add("parameters.scale", "not supported yet")
        ext = raw.get("tadmerge")
        if isinstance(ext, dict) and "sparsify" in ext:
            problems.add("tadmerge.sparsify", "passthrough copies its tensors: nothing to sparsify")
        flat = {k: v for k, v in flat.items() if k not in ("base_model", "parameters", "tadmerge")}
        flat["merge_method"] = "linear"  # (translated as linear, then made passthrough)
        flat["models"] = [{"model": r, "parameters": {"weight": 1.0}} for r in refs]
        if isinstance(ext, dict):
            flat["tadmerge"] = {k: v for k, v in ext.items() if k != "sparsify"}
        order = refs
    else:
        names = [sorted({r for r, _, _ in sl}) for sl in slices]
        for i, n in enumerate(names[1:], 1):
            if n != names[0]:
                problems.add(
                    f"slices[{i}].sources",
                    f"models {', '.join(n)} differ from slices[0]'s ({', '.join(names[0])}): "
                    "tadmerge merges the same models in every slice",
                )
        first: dict[str, dict] = {}
        for i, sl in enumerate(slices):
            for j, (ref, _, params) in enumerate(sl):
                if first.setdefault(ref, params) != params:
                    problems.add(
                        f"slices[{i}].sources[{j}].parameters",
                        f"differ from {show(ref)}'s in an earlier slice (parameters per slice "
                        "are not supported yet)",
                    )
        if method != "linear" and base is not None:
            for i, sl in enumerate(slices):
                if base not in {r for r, _, _ in sl}:
                    problems.add(
                        f"slices[{i}].sources",
                        f"base_model {show(base)} is not a source: {method} takes its task "
                        "vectors against the base's layers (as in mergekit)",
                    )
        if method == "linear" and base is not None and base not in refs:
            flat.pop("base_model")  # (with slices mergekit merges the sources only)
        flat["models"] = [{"model": r, "parameters": first.get(r, {})} for r in refs]
        order = [r for r in refs if method == "linear" or r != base]
    native, notes = _translated(flat, cwd, translate, problems)
    if method == "passthrough":
        native["merge"] = {"method": "passthrough"}
        native["sparsify"] = {"method": "none"}
        native["base"] = _resolve_path(base, cwd, "base_model") if base else native["base"]
        for m in native["models"]:
            m.pop("weight", None)
        dtype = native["output"].pop("dtype", None) if isinstance(native["output"], dict) else None
        notes = [n for n in notes if not n.startswith("dtype:")]
        if dtype is not None:
            notes.append(
                f"dtype: {dtype}: passthrough copies the sources' bytes in their own dtype "
                "(mergekit casts them)"
            )
    name = {r: m["name"] for r, m in zip(order, native["models"], strict=True)}
    native["slices"] = []
    for sl in slices:
        srcs = {r: lr for r, lr, _ in sl}
        if method == "passthrough":
            entry = [{"model": name[r], "layer_range": lr} for r, lr, _ in sl]
        else:
            base_ref = base if base in srcs else order[0]
            entry = [{"model": "base", "layer_range": srcs[base_ref]}]
            entry += [{"model": name[r], "layer_range": srcs[r]} for r in order]
        native["slices"].append({"sources": entry})
    return native, notes


def _gradient(setting) -> bool:
    """Whether a mergekit setting holds a gradient (a list of scalars), also as
    the value of a {filter, value} entry."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return False
    if all(isinstance(e, dict) for e in setting):
        return any(_gradient(e.get("value")) for e in setting)
    return len(set(map(repr, setting))) > 1


def _translated(
    flat: dict, cwd: Path, translate: Translate, problems: _Problems
) -> tuple[dict, list[str]]:
    """translate() of the flattened config; its problems joined with ours in one error."""
    try:
        native, notes = translate(flat, cwd)
    except ConfigError as e:
        text = str(e)
        problems.extend(text.split("): ", 1)[1].split("; ") if "): " in text else [text])
        _raise(problems)
    _raise(problems)
    return native, notes


def _raise(problems: _Problems) -> None:
    if not problems:
        return
    n = len(problems)
    head = "1 unsupported setting" if n == 1 else f"{n} unsupported settings"
    raise ConfigError(
        f"mergekit config: {head} (tadmerge reads mergekit {MERGEKIT_VERSION} configs; "
        f"README 'Coming from mergekit'): " + "; ".join(problems)
    )
