"""mergekit (0.1.5) configs, translated into tadmerge's native config.

A mergekit YAML (detected by its `merge_method` key) runs unchanged:
`tadmerge merge mergekit.yml`. It is translated here into the native mapping that
config.parse_config validates, so that the two formats share one parser, and
`tadmerge convert mergekit.yml` prints that mapping: the native config of the same
merge.

What maps (docs/semantics.md, "Coming from mergekit"): mergekit's generalized task
arithmetic methods are a sparsifier × a combiner here —

    method            sparsify                      merge
    linear            none                          linear (normalize)
    task_arithmetic   none                          task_arithmetic (scale = lambda)
    ties              magnitude                     ties (disjoint mean|sum = normalize)
    dare_ties         random (p = 1 - density)      ties
    dare_linear       random                        task_arithmetic
    breadcrumbs       magnitude_outliers            task_arithmetic
    breadcrumbs_ties  magnitude_outliers            ties
    della             della                         ties
    della_linear      della                         task_arithmetic
    nearswap          none                          nearswap (t; one model)
    ram               none                          ram (epsilon)
    ramplus_tl        none                          ramplus_tl (r, alpha, epsilon)
    sce               none                          sce (select_topk; int8_mask, a
                                                    memory option, has no effect)
    arcee_fusion      none                          arcee_fusion (no parameters; one
                                                    model)
    slerp, nuslerp, multislerp, karcher, model_stock
                      none                          the combiner of that name

The last five merge the weights from exact whole-tensor sums (norms, dot
products: engine/sums.py); without base_model, nuslerp and multislerp take the
models' weights (tasks: false) and the first model gives the layout.

`normalize` without a sign consensus divides by the sum of the weights: the
weights are divided here (w_k / Σ w) and the merge is task_arithmetic. Everything
tadmerge does not support is collected and raised as ONE ConfigError naming every
key, before any checkpoint is read.

The tadmerge extension: a top-level `tadmerge:` mapping (mergekit ignores unknown
top-level keys, so the same file still runs in mergekit) with native sections —
`sparsify` (a method name such as `tadrop`, or a native sparsify mapping; it
replaces the method's own sparsifier: sce's variance selection too), `output`,
`runtime`, `inputs`, `exclude`, `seed`, `emr`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import methods
from ..errors import ConfigError
from ..schema import show

log = logging.getLogger("tadmerge")

MERGEKIT_VERSION = "0.1.5"


@dataclass(frozen=True)
class _Gta:
    """One of mergekit's generalized task arithmetic methods."""

    sparsify: str  # tadmerge's sparsifier ("none" for none)
    consensus: bool  # TIES sign election
    normalize: bool  # mergekit's default
    rescale: bool  # mergekit's default


GTA = {
    "task_arithmetic": _Gta("none", False, False, False),
    "ties": _Gta("magnitude", True, True, False),
    "dare_ties": _Gta("random", True, False, True),
    "dare_linear": _Gta("random", False, False, True),
    "breadcrumbs": _Gta("magnitude_outliers", False, False, False),
    "breadcrumbs_ties": _Gta("magnitude_outliers", True, False, False),
    "della": _Gta("della", True, True, True),
    "della_linear": _Gta("della", False, False, True),
}
# mergekit's methods that are one combiner of their own here, with no per-model
# parameter: their shared parameters, name -> (kind, default; ... is required); how
# many models each takes, and that it reads no weight (as in mergekit), are the
# native combiner's declarations (methods/: models, uses_weights)
OWN: dict[str, dict[str, tuple[str, Any]]] = {
    "nearswap": {"t": ("number", ...)},
    "ram": {"epsilon": ("number", 1e-5)},
    "ramplus_tl": {"r": ("number", 0.1), "alpha": ("number", 0.2), "epsilon": ("number", 1e-5)},
    "sce": {"select_topk": ("number", 1.0), "int8_mask": ("bool", False)},
    "arcee_fusion": {},
}


# mergekit's methods that tadmerge merges with a tensor-sums combiner of the same
# name (methods/: exact norms and dot products, engine/sums.py): its shared
# parameters (kind, default; ... is required) as mergekit declares them, and whether
# it needs (True), takes (None) or ignores the base (False: karcher averages it with
# the models); whether it reads a weight per model is the native combiner's
# declaration (uses_weights)
@dataclass(frozen=True)
class _Sums:
    shared: dict
    base: bool | None


SUMS = {
    "slerp": _Sums({"t": ("number", ...)}, True),
    "nuslerp": _Sums(
        {"nuslerp_row_wise": ("bool", False), "nuslerp_flatten": ("bool", True)}, None
    ),
    "multislerp": _Sums({"normalize_weights": ("bool", True), "eps": ("number", 1e-8)}, None),
    "karcher": _Sums({"max_iter": ("int", 10), "tol": ("number", 1e-5)}, False),
    "model_stock": _Sums({"filter_wise": ("bool", False)}, True),
}
SUPPORTED = ("linear", *GTA, *OWN, *SUMS)
NOT_YET: tuple[str, ...] = ()

TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "tokenizer", "tadmerge"}  # fmt: skip
# mergekit keys tadmerge does not implement yet (named in the error)
TOP_UNSUPPORTED = {
    "modules": "modules are not supported yet",
    "chat_template": "chat_template is not supported yet",
}
EXTENSION_KEYS = {"sparsify", "output", "runtime", "inputs", "exclude", "seed", "emr"}
DTYPES = {"float32", "bfloat16", "float16", "float64"}
_NAME_BAD = re.compile(r"[^A-Za-z0-9_.-]")


def is_mergekit(raw: Any) -> bool:
    """A mergekit config: a mapping with `merge_method` (a native one has `merge`)."""
    return isinstance(raw, dict) and "merge_method" in raw


def _spec(method: str) -> tuple[dict[str, tuple[str, Any]], dict[str, tuple[str, Any]]]:
    """mergekit's declared parameters of `method`: (shared, per model), each
    name -> (kind, default); a default of ... is required."""
    if method == "linear":
        return {"normalize": ("bool", True)}, {"weight": ("number", ...)}
    if method in OWN or method in SUMS:  # (a weight where the native combiner reads one)
        shared = OWN[method] if method in OWN else SUMS[method].shared
        uses = methods.combiner(method).uses_weights
        return dict(shared), ({"weight": ("number", ...)} if uses else {})
    g = GTA[method]
    shared = {
        "int8_mask": ("bool", False),
        "normalize": ("bool", g.normalize),
        "rescale": ("bool", g.rescale),
        "lambda": ("number", 1.0),
    }
    per_model = {"weight": ("number", ...), "density": ("number", 1.0)}
    if g.sparsify == "magnitude_outliers":
        per_model["gamma"] = ("number", 0.01)
    if g.sparsify == "della":
        per_model["epsilon"] = ("number", 0.15)
    return shared, per_model


class _Problems(list):
    def add(self, where: str, why: str) -> None:
        self.append(f"{where}: {why}")


def _scalar(value: Any, kind: str, where: str, problems: _Problems) -> Any:
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
        problems.add(where, f"expected true or false, got {show(value)}")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.add(where, f"expected a number, got {show(value)}")
        return None
    return float(value)


def _setting(value: Any, kind: str, where: str, problems: _Problems) -> Any:
    """One parameter setting, or None (absent or not mappable: then a problem is
    added). mergekit's forms: a scalar; a list of scalars (a gradient over the
    layers); {value, filter} or a list of them (the first whose filter is a
    substring of the tensor name applies). A "number" keeps those forms: the
    native number parameters and model weights take them per tensor
    (methods/registry.py tensor_value, mergekit's rule); a setting whose every
    value is the same is that value. A "bool" or an "int" must be one value for
    every tensor (the native parameter is one)."""
    if isinstance(value, dict) and "value" in value:
        value = [value]
    if isinstance(value, list) and value and all(isinstance(e, dict) for e in value):
        out: list[dict] = []
        for i, cond in enumerate(value):
            extra = set(cond) - {"value", "filter"}
            if "value" not in cond or extra:
                problems.add(f"{where}[{i}]", "expected {value, filter}")
                return None
            f = cond.get("filter")
            if f is not None and not isinstance(f, str):
                problems.add(f"{where}[{i}].filter", f"expected a string, got {show(f)}")
                return None
            v = _setting(cond["value"], kind, f"{where}[{i}].value", problems)
            if v is None:
                return None
            out.append({"filter": f, "value": v})
            if f in (None, "*"):
                break  # (the entries after a catch-all never apply)
        values = {repr(e["value"]) for e in out}
        if len(values) == 1 and out[-1]["filter"] in (None, "*"):
            return out[0]["value"]  # every tensor gets the same value: one value
        if kind != "number":
            filters = [e["filter"] for e in out if e["filter"] not in (None, "*")]
            problems.add(
                where,
                f"values per tensor (filter {', '.join(map(show, filters))}) are not supported "
                f"for this {kind} parameter (one value for every tensor)",
            )
            return None
        return out
    if isinstance(value, list):
        if not value:
            return None
        vals = [_scalar(v, kind, f"{where}[{i}]", problems) for i, v in enumerate(value)]
        if any(v is None for v in vals):
            return None
        if all(v == vals[0] for v in vals):
            return vals[0]
        if kind != "number":
            problems.add(
                where,
                f"a layer gradient {show(value)} is not supported for this {kind} parameter "
                "(one value for every layer)",
            )
            return None
        return vals
    if value is None:
        return None
    return _scalar(value, kind, where, problems)


def _or_else(setting: Any, fallback: Any) -> Any:
    """`setting`, and where it is {filter, value} entries none of which applies to
    a tensor, `fallback` there: mergekit then reads the next scope (the model's
    parameters, the top-level ones, the default). None: no fallback."""
    if not _entries(setting) or fallback is None or setting[-1]["filter"] in (None, "*"):
        return setting
    more = fallback if _entries(fallback) else [{"filter": None, "value": fallback}]
    return setting + more


def _entries(setting: Any) -> bool:
    return isinstance(setting, list) and bool(setting) and isinstance(setting[0], dict)


def _numbers(setting: Any) -> list[float]:
    """Every number a setting may take at its ends (a gradient's values lie between)."""
    if _entries(setting):
        return [x for e in setting for x in _numbers(e["value"])]
    if isinstance(setting, list):
        return list(setting)
    return [setting]


def _mapped(setting: Any, f) -> Any:
    """A setting with `f` applied to each of its numbers (an affine f commutes with
    a gradient's interpolation, up to rounding)."""
    if _entries(setting):
        return [{"filter": e["filter"], "value": _mapped(e["value"], f)} for e in setting]
    if isinstance(setting, list):
        return [f(x) for x in setting]
    return f(setting)


def _varies(setting: Any) -> bool:
    return isinstance(setting, list)


def _model_ref(value: Any, where: str, problems: _Problems) -> str | None:
    if isinstance(value, dict):
        problems.add(
            where,
            "a model given as a mapping (lora, override_architecture) is not "
            "supported yet; give its path or repo id",
        )
        return None
    if not isinstance(value, str) or not value:
        problems.add(where, f"expected a path or a repo id, got {show(value)}")
        return None
    if "+" in value:
        problems.add(where, f"{show(value)}: a LoRA applied with '+' is not supported yet")
        return None
    return value


def _name(path: str, seen: set[str]) -> str:
    stem = Path(path.rstrip("/")).name.split("@")[0] or "model"
    name = _NAME_BAD.sub("_", stem)[:120]
    if not name[0].isalnum():
        name = "m" + name
    out, i = name, 2
    while out in seen:
        out, i = f"{name}_{i}", i + 1
    seen.add(out)
    return out


def translate(raw: dict, cwd: str | Path) -> tuple[dict, list[str]]:
    """The native config mapping of a mergekit config, and notes (what is ignored,
    where the definitions differ). Local paths are made absolute against `cwd` (as
    mergekit reads them). Raises one ConfigError naming every unsupported key."""
    from ..config import _resolve_path

    cwd = Path(cwd)
    if "slices" in raw or raw.get("merge_method") == "passthrough":
        from .mergekit_slices import translate_slices  # (layer stacking)

        return translate_slices(raw, cwd, translate)
    problems = _Problems()
    notes: list[str] = []

    for key in sorted(set(raw) - TOP_KEYS, key=str):
        if key in TOP_UNSUPPORTED:
            problems.add(key, TOP_UNSUPPORTED[key])
        else:
            notes.append(
                f"{key}: not a mergekit {MERGEKIT_VERSION} key; ignored (as mergekit does)"
            )

    method = raw.get("merge_method")
    if method not in SUPPORTED:
        if method in NOT_YET:
            why = f"{show(method)} is not supported by tadmerge yet"
        else:
            why = f"unknown method {show(method)}"
        problems.add("merge_method", f"{why} (supported: {', '.join(SUPPORTED)})")
        shared_spec: dict = {}
        model_spec: dict = {}
    else:
        shared_spec, model_spec = _spec(method)

    # global parameters: the shared ones, and the per-model ones' fallback
    params = raw.get("parameters") or {}
    if not isinstance(params, dict):
        problems.add("parameters", f"expected a mapping, got {type(params).__name__}")
        params = {}
    known = {**shared_spec, **model_spec}
    for key in params:
        if method in SUPPORTED and key not in known:
            notes.append(f"parameters.{key}: {method} takes no {key}; ignored (as mergekit does)")
    glob = {
        k: _setting(params[k], kind, f"parameters.{k}", problems)
        for k, (kind, _) in known.items()
        if k in params
    }
    shared = {}
    for k, (_, default) in shared_spec.items():
        fallback = None if default is ... else default
        shared[k] = default if glob.get(k) is None else _or_else(glob[k], fallback)
        if shared[k] is ... and k not in params:
            problems.add(f"parameters.{k}", f"required by {method} (as in mergekit)")

    # models
    base = raw.get("base_model")
    if base is not None:
        base = _model_ref(base, "base_model", problems)
    entries = raw.get("models")
    if not isinstance(entries, list) or not entries:
        if "slices" not in raw and "modules" not in raw:
            problems.add("models", "expected a non-empty list of {model, parameters}")
        entries = []
    inputs: list[tuple[str, dict]] = []  # (model, resolved per-model values)
    base_listed = False
    for i, m in enumerate(entries):
        where = f"models[{i}]"
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or "model" not in m:
            problems.add(where, "expected {model, parameters}")
            continue
        for key in sorted(set(m) - {"model", "parameters"}, key=str):
            notes.append(f"{where}.{key}: not a mergekit key; ignored (as mergekit does)")
        ref = _model_ref(m["model"], f"{where}.model", problems)
        mp = m.get("parameters") or {}
        if not isinstance(mp, dict):
            problems.add(f"{where}.parameters", "expected a mapping")
            mp = {}
        if ref is not None and base is not None and ref == base:
            base_listed = True
            if method not in ("linear", "karcher"):  # the base of the others is not a model
                continue
        values = {}
        for k in mp:
            if k in shared_spec:
                notes.append(
                    f"{where}.parameters.{k}: set per model, mergekit reads it from "
                    "the top-level parameters only; ignored"
                )
            elif method in SUPPORTED and k not in model_spec:
                notes.append(f"{where}.parameters.{k}: {method} takes no {k}; ignored")
        for k, (kind, default) in model_spec.items():
            v = _setting(mp[k], kind, f"{where}.parameters.{k}", problems) if k in mp else None
            # mergekit's precedence, per tensor: the model's, the top level's, the default
            fallback = None if default is ... else default
            if glob.get(k) is not None:
                fallback = _or_else(glob[k], fallback)
            v = fallback if v is None else _or_else(v, fallback)
            if v is None and default is ... and k not in mp and k not in params:
                problems.add(f"{where}.parameters.{k}", f"required by {method} (as in mergekit)")
            values[k] = default if v is None else v
        if ref is not None:
            inputs.append((ref, values))
    if method == "linear" and base is not None and not base_listed:
        # mergekit adds the base to linear's inputs, with the top-level parameters
        w = glob.get("weight")
        if w is None:
            problems.add("parameters.weight", "required: mergekit's linear merges base_model too")
        inputs.append((base, {"weight": w if w is not None else 1.0}))
    if method == "karcher" and base is not None and not base_listed:
        inputs.append((base, {}))  # mergekit's karcher averages the base with the models
    if (method in GTA or method in OWN or (method in SUMS and SUMS[method].base)) and base is None:
        problems.add("base_model", f"required by {method} (task vectors are taken from it)")
    if (method in SUMS or method in OWN) and inputs:
        least, most = methods.combiner(method).models  # (the native combiner of that name)
        if len(inputs) < least or (most is not None and len(inputs) > most):
            want = f"exactly {least}" if least == most else f"at least {least}"
            problems.add("models", f"{method} merges {want} model(s) besides base_model")
    if method in SUPPORTED and entries and not inputs and not problems:
        problems.add("models", "no model to merge besides base_model")

    # the sparsifier's parameters: the first model's for every model, and each
    # model's own where it differs (models[i].sparsify in the native config); each
    # a number or per tensor (a gradient, {filter, value} entries)
    one: dict[str, Any] = {}
    own: list[dict[str, Any]] = [{} for _ in inputs]
    for k in ("density", "gamma", "epsilon"):
        if k not in model_spec or not inputs:
            continue
        vals = [v[k] for _, v in inputs]
        one[k] = vals[0]
        for i, v in enumerate(vals):
            if v != vals[0]:
                own[i][k] = v
    checked = [("", one)] if not any(own) else [
        (f" (model {show(ref)})", {**one, **o}) for (ref, _), o in zip(inputs, own, strict=True)
    ]  # fmt: skip
    for which, vals in checked:
        _check_sparsify_values(vals, which, problems)

    ext = raw.get("tadmerge") or {}
    if not isinstance(ext, dict):
        problems.add("tadmerge", f"expected a mapping, got {type(ext).__name__}")
        ext = {}
    for key in sorted(set(ext) - EXTENSION_KEYS, key=str):
        problems.add(
            f"tadmerge.{key}", f"unknown key; allowed: {', '.join(sorted(EXTENSION_KEYS))}"
        )
    ext_sparsify = ext.get("sparsify")
    if isinstance(ext_sparsify, str):
        ext_sparsify = {"method": ext_sparsify}
    if ext_sparsify is not None and not isinstance(ext_sparsify, dict):
        problems.add("tadmerge.sparsify", "expected a method name or a mapping")
        ext_sparsify = None
    if ext_sparsify is not None and method in SUMS:
        problems.add("tadmerge.sparsify", f"{method} merges the weights: it takes no sparsifier")
    if ext_sparsify is not None and method == "linear":
        problems.add(
            "tadmerge.sparsify",
            "linear merges the weights, not task vectors: use task_arithmetic with normalize: true",
        )

    g = GTA.get(method)
    if g and not g.consensus and shared.get("normalize") is True:
        if any(_varies(v.get("weight")) for _, v in inputs):
            problems.add(
                "parameters.normalize",
                f"true with weights per tensor is not supported yet for {method} (the "
                "weights are divided by their sum once, in the translation)",
            )
    dtype = _dtype(raw.get("dtype"), "dtype", problems)
    out_dtype = _dtype(raw.get("out_dtype"), "out_dtype", problems)
    tok, tok_key = _tokenizer_source(raw, problems)

    if problems:
        n = len(problems)
        head = "1 unsupported setting" if n == 1 else f"{n} unsupported settings"
        raise ConfigError(
            f"mergekit config: {head} (tadmerge reads mergekit {MERGEKIT_VERSION} configs; "
            f"README 'Coming from mergekit'): " + "; ".join(problems)
        )

    def local(p: str, key: str) -> str:
        return _resolve_path(p, cwd, key)

    base_path = base if base is not None else inputs[0][0]
    seen: set[str] = set()
    models = [
        {"path": local(p, "models"), "name": _name(p, seen), "weight": v.get("weight", 1.0)}
        for p, v in inputs
    ]
    native: dict[str, Any] = {"base": local(base_path, "base_model"), "models": models}
    if method in SUMS:
        native["sparsify"] = {"method": "none"}
        native["merge"] = _sums_merge(method, shared, base is not None)
    elif method == "linear":
        native["sparsify"] = {"method": "none"}
        native["merge"] = {"method": "linear", "normalize": shared["normalize"]}
    elif method in OWN:
        native["sparsify"] = dict(ext_sparsify) if ext_sparsify is not None else {"method": "none"}
        merge = {k: v for k, v in shared.items() if k != "int8_mask"}
        if method == "sce" and ext_sparsify is not None:
            if min(_numbers(merge["select_topk"])) < 1:
                notes.append(
                    "tadmerge.sparsify replaces sce's variance selection: select_topk not used"
                )
            merge["select_topk"] = 1.0
        native["merge"] = {"method": method, **merge}
    else:
        g = GTA[method]
        density = one.get("density", 1.0)
        if ext_sparsify is not None:
            sp = dict(ext_sparsify)
            unused = [k for k in ("density", "gamma", "epsilon", "rescale") if k in params]
            if unused:
                notes.append(
                    f"tadmerge.sparsify replaces {method}'s sparsifier: "
                    f"{', '.join(unused)} not used"
                )
        elif (
            g.sparsify == "none"
            or min(_numbers(density) + [x for o in own for x in _numbers(o.get("density", 1.0))])
            >= 1.0
        ):
            sp = {"method": "none"}  # mergekit keeps every entry at density >= 1
        elif g.sparsify == "random":
            sp = {"method": "random", "p": _mapped(_capped(density), lambda d: 1.0 - d)}
            sp["rescale"] = "inverse_keep" if shared["rescale"] else "none"
        elif g.sparsify == "della":
            sp = {"method": "della", "density": _capped(density), "epsilon": one["epsilon"]}
            sp["rescale"] = "inverse_keep" if shared["rescale"] else "none"
        else:
            sp = {"method": g.sparsify, "density": _capped(density)}
            if g.sparsify == "magnitude_outliers":
                sp["gamma"] = one["gamma"]
            sp["rescale"] = "l1" if shared["rescale"] else "none"
        if sp["method"] in ("random", "della") and shared["rescale"] and ext_sparsify is None:
            notes.append(
                f"rescale: {method}'s kept entries are scaled by 1/(keep probability) "
                "(DARE's rule); mergekit restores each tensor's l1 norm (equal in "
                "expectation)"
            )
        native["sparsify"] = sp
        if any(own) and ext_sparsify is None and sp["method"] != "none":
            for m, o in zip(models, own, strict=True):
                if o:
                    m["sparsify"] = _own_sparsify(sp["method"], o)
        elif any(own) and ext_sparsify is not None:
            notes.append(f"tadmerge.sparsify replaces {method}'s sparsifier: the "
                         "per-model density, gamma, epsilon are not used")  # fmt: skip
        lam = shared["lambda"]
        if g.consensus:
            disjoint = "mean" if shared["normalize"] else "sum"
            native["merge"] = {"method": "ties", "scale": lam, "disjoint": disjoint}
        else:
            total = sum(m["weight"] for m in models)
            if shared["normalize"] and abs(total) >= 1e-8:  # mergekit's divisor guard
                for m in models:
                    m["weight"] = m["weight"] / total
            native["merge"] = {"method": "task_arithmetic", "scale": lam}
    if dtype not in (None, "float32"):
        notes.append(
            f"dtype: {dtype}: tadmerge computes in float32 and casts once; mergekit "
            f"computes in {dtype} (results differ by {dtype}'s rounding)"
        )
    output = dict(ext.get("output") or {}) if isinstance(ext.get("output"), dict) else {}
    if "output" in ext and not isinstance(ext.get("output"), dict):
        native["output"] = ext["output"]  # the native parser names what is wrong
    else:
        out_path = output.get("path", "out")
        if isinstance(out_path, str) and out_path and not Path(out_path).is_absolute():
            out_path = str((cwd / out_path).resolve())  # mergekit's output is cwd-relative
        output["path"] = out_path
        out = output.get("dtype") or out_dtype or dtype
        if out is not None:
            output["dtype"] = out
        native["output"] = output
    for key in ("runtime", "inputs", "exclude", "seed", "emr"):
        if key in ext:
            native[key] = ext[key]
    source = "base" if tok in (None, "base") else _tokenizer_name(tok, tok_key, native, local)
    if source != "base":  # (base: the native default)
        native["tokenizer"] = {"source": source}
    return native, notes


def _tokenizer_source(raw: dict, problems: _Problems) -> tuple[Any, str]:
    """mergekit's tokenizer_source, or tokenizer.source (default union), and the key
    it came from; tokens / pad_to_multiple_of are named as not supported."""
    if "tokenizer" not in raw or raw.get("tokenizer") is None:
        return raw.get("tokenizer_source"), "tokenizer_source"
    t = raw["tokenizer"]
    if "tokenizer_source" in raw:
        problems.add("tokenizer", "cannot be given with tokenizer_source (as in mergekit)")
    if not isinstance(t, dict):
        problems.add("tokenizer", "expected a mapping {source, tokens, pad_to_multiple_of}")
        return None, "tokenizer.source"
    for key in sorted(set(t) - {"source"}, key=str):
        why = {
            "tokens": "per-token embedding sources are not supported yet (rows a model "
            "lacks are filled as mergekit's defaults do)",
            "pad_to_multiple_of": "not supported yet (the output keeps the source's rows)",
        }.get(key, "not a mergekit key")
        problems.add(f"tokenizer.{key}", why)
    return t.get("source", "union"), "tokenizer.source"


def _tokenizer_name(tok: Any, key: str, native: dict, local) -> str:
    """The native tokenizer.source of mergekit's: union, or the name of the model
    whose path it is (base when it is the base's)."""
    if tok == "union":
        return tok
    if isinstance(tok, dict):  # (a mergekit model reference: {model: path})
        tok = tok.get("model")
    if not isinstance(tok, str) or not tok:
        raise ConfigError(f"{key}: expected union, base or a model's path, got {show(tok)}")
    path = local(tok, key)
    if path == native["base"]:
        return "base"
    for m in native["models"]:
        if m["path"] == path:
            return m["name"]
    raise ConfigError(f"{key}: {show(tok)} is neither the base_model nor one of the models")


def _sums_merge(method: str, shared: dict, has_base: bool) -> dict:
    """The native merge section of a tensor-sums method (methods/<method>.py)."""
    if method == "slerp":
        return {"method": "slerp", "t": shared["t"]}
    if method == "nuslerp":
        return {
            "method": "nuslerp",
            "tasks": has_base,
            "row_wise": shared["nuslerp_row_wise"],
            "flatten": shared["nuslerp_flatten"],
        }
    if method == "multislerp":
        return {
            "method": "multislerp",
            "tasks": has_base,
            "normalize_weights": shared["normalize_weights"],
            "eps": shared["eps"],
        }
    if method == "karcher":
        return {"method": "karcher", "max_iter": int(shared["max_iter"]), "tol": shared["tol"]}
    return {"method": "model_stock", "filter_wise": shared["filter_wise"]}


def _check_sparsify_values(one: dict[str, Any], which: str, problems: _Problems) -> None:
    """density, gamma, epsilon as mergekit accepts them (`which`: the model, where the
    values differ per model); a per-tensor value by each number it may take (the
    della rule on two per-tensor values is checked per tensor when the plan is made)."""
    for d in _numbers(one.get("density", 1.0)):
        if d <= 0:
            problems.add(
                "density" + which,
                f"{show(d)}: a density <= 0 drops every entry; not supported (0 < density <= 1)",
            )
    for gamma in _numbers(one.get("gamma", 0.0)):
        if not 0 <= gamma < 1:
            problems.add("gamma" + which, f"{show(gamma)}: expected 0 <= gamma < 1")
    d = one.get("density")
    if "epsilon" in one and not _varies(d) and not _varies(one["epsilon"]) and 0 < d < 1:
        e = one["epsilon"]
        if not (d - e > 0 and d + e < 1):
            problems.add(
                "epsilon" + which,
                f"della needs 0 < density - epsilon and density + epsilon "
                f"< 1 (as mergekit does; density {d}, epsilon {e})",
            )


def _capped(density: Any) -> Any:
    """A mergekit density as the native one (<= 1): a density >= 1 keeps every
    entry in mergekit, as 1 does. A gradient is capped by its ends when they lie on
    one side of 1 (capping a gradient that crosses 1 is not a gradient: kept, and
    the native range check names it)."""
    nums = _numbers(density)
    if all(x >= 1 for x in nums) or all(x <= 1 for x in nums):
        return _mapped(density, lambda x: min(x, 1.0))
    return density


def _own_sparsify(method: str, own: dict[str, Any]) -> dict[str, Any]:
    """A model's own mergekit density/gamma/epsilon as the native sparsifier's values."""
    out: dict[str, Any] = {}
    if "density" in own:
        if method == "random":
            out["p"] = _mapped(_capped(own["density"]), lambda d: 1.0 - d)
        else:
            out["density"] = _capped(own["density"])  # (>= 1 keeps everything, as mergekit)
    if "gamma" in own and method == "magnitude_outliers":
        out["gamma"] = own["gamma"]
    if "epsilon" in own and method == "della":
        out["epsilon"] = own["epsilon"]
    return out


def _dtype(value: Any, where: str, problems: _Problems) -> str | None:
    if value is None:
        return None
    name = (
        value[len("torch.") :] if isinstance(value, str) and value.startswith("torch.") else value
    )
    if name not in DTYPES:
        problems.add(where, f"{show(value)} is not supported (one of {', '.join(sorted(DTYPES))})")
        return None
    return name


def to_yaml(native: dict, notes: list[str], source: str) -> str:
    """The native config as YAML, the notes above it as comments."""
    import yaml

    head = [f"# tadmerge native config, translated from the mergekit config {source}"]
    head += [f"# note: {n}" for n in notes]
    return "\n".join(head) + "\n" + yaml.safe_dump(native, sort_keys=False)
