"""Layer stacking (`slices:`) and per-model sparsifier values, as the config gives them.

`slices` lists the output's layers in order, each slice taking a range of source
layers (mergekit's `slices`/`layer_range`). With `merge.method: passthrough`
each slice has one source, whose layers are copied byte for byte, renumbered;
with an element-wise combiner (task_arithmetic, ties, linear, ...) each slice
lists the base and every model once, over ranges of the same length, and layer
i of the slice is the merge of their layers at the same offset.

`models[i].sparsify` sets some of the sparsifier's parameters for that model's
task vector alone (mergekit's per-model density): SparsifySpec.tasks holds the
overrides, and SparsifySpec.for_task(k) is the spec task k is sparsified with.

Plain data and checks: no checkpoint is read here (planners/slices.py does).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from . import methods
from .engine.spec import SparsifySpec
from .errors import ConfigError
from .schema import MAX_INT, show

BASE = "base"  # a slice source naming the base
PASSTHROUGH = "passthrough"
# combiners that cannot take slices (EMR keeps a τ_uni and masks per tensor of the base)
NO_SLICES = frozenset({"emr"})
# sparsifier parameters that must be the same for every task (one statistics pass each)
SHARED_SPARSIFY = frozenset({"scope", "rescale"})


@dataclass(frozen=True)
class SliceSource:
    model: str  # a model's name, or BASE
    start: int  # first source layer
    end: int  # one past the last

    @property
    def layers(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Slice:
    sources: tuple[SliceSource, ...]

    @property
    def layers(self) -> int:
        return self.sources[0].layers


def slices_to_list(slices: tuple[Slice, ...]) -> list[dict]:
    """The native config form (MergeConfig.to_dict, merge_config.yaml)."""
    return [
        {"sources": [{"model": s.model, "layer_range": [s.start, s.end]} for s in sl.sources]}
        for sl in slices
    ]


def output_layers(slices: tuple[Slice, ...]) -> int:
    return sum(sl.layers for sl in slices)


def parse_slices(raw: Any, model_names: list[str], method: str) -> tuple[Slice, ...]:
    """`slices` checked against the models and the merge method (ConfigError naming
    the key). passthrough: one source per slice, the base or a model; another
    combiner: the base and every model once per slice, ranges of equal length."""
    if raw is None:
        if method == PASSTHROUGH:
            raise ConfigError(
                "slices: required by merge.method passthrough (the layer ranges to stack: "
                "[{sources: [{model: NAME, layer_range: [start, end]}]}, ...])"
            )
        return ()
    if method in NO_SLICES:
        raise ConfigError(f"slices: not supported with merge.method {method}")
    if not isinstance(raw, list) or not raw:
        raise ConfigError("slices: expected a non-empty list of {sources: [...]}")
    if BASE in model_names:
        raise ConfigError(
            f"models[{model_names.index(BASE)}].name: 'base' names the base in slices; "
            "give this model another name"
        )
    known = set(model_names) | {BASE}
    out = []
    for i, sl in enumerate(raw):
        where = f"slices[{i}]"
        if not isinstance(sl, dict) or set(sl) != {"sources"}:
            raise ConfigError(f"{where}: expected {{sources: [{{model, layer_range}}, ...]}}")
        srcs = sl["sources"]
        if not isinstance(srcs, list) or not srcs:
            raise ConfigError(
                f"{where}.sources: expected a non-empty list of {{model, layer_range}}"
            )
        parsed = [_source(s, f"{where}.sources[{j}]", known) for j, s in enumerate(srcs)]
        lengths = {s.layers for s in parsed}
        if len(lengths) > 1:
            raise ConfigError(
                f"{where}.sources: every source of a slice spans the same number of layers "
                f"(got {', '.join(str(s.layers) for s in parsed)})"
            )
        names = [s.model for s in parsed]
        if method == PASSTHROUGH:
            if len(parsed) != 1:
                raise ConfigError(
                    f"{where}.sources: passthrough takes one source per slice, got {len(parsed)} "
                    "(to merge layers, use an element-wise merge.method with slices)"
                )
        else:
            want = sorted([BASE, *model_names])
            if sorted(names) != want:
                raise ConfigError(
                    f"{where}.sources: with merge.method {method} each slice lists the base "
                    f"('base') and every model once ({', '.join(want)}), got {', '.join(names)}"
                )
        out.append(Slice(tuple(parsed)))
    return tuple(out)


def _source(raw: Any, where: str, known: set[str]) -> SliceSource:
    if not isinstance(raw, dict) or set(raw) != {"model", "layer_range"}:
        raise ConfigError(f"{where}: expected {{model: NAME, layer_range: [start, end]}}")
    model = raw["model"]
    if not isinstance(model, str) or model not in known:
        raise ConfigError(
            f"{where}.model: {show(model)} is not a model's name nor 'base' "
            f"(names: {', '.join(sorted(known))})"
        )
    lr = raw["layer_range"]
    if (
        not isinstance(lr, list)
        or len(lr) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) for v in lr)
        or not 0 <= lr[0] < lr[1] < MAX_INT
    ):
        raise ConfigError(
            f"{where}.layer_range: expected [start, end] with 0 <= start < end, got {show(lr)}"
        )
    return SliceSource(model, lr[0], lr[1])


def parse_task_sparsify(raw_models: Any, sparsify: SparsifySpec, shared: dict) -> SparsifySpec:
    """`models[i].sparsify`: per-task values of the sparsifier's parameters, checked
    like the section itself (the method's ranges and cross-parameter rules, on the
    values task i gets). The spec with `tasks` set; unchanged when none is given."""
    if not isinstance(raw_models, list):
        return sparsify
    method = methods.sparsifier(sparsify.method)
    base_values = {p.name: getattr(sparsify, p.name) for p in method.params}
    tasks: list[tuple[tuple[str, Any], ...]] = []
    for i, m in enumerate(raw_models):
        over = m.get("sparsify") if isinstance(m, dict) else None
        if over is None:
            tasks.append(())
            continue
        where = f"models[{i}].sparsify"
        if not isinstance(over, dict):
            raise ConfigError(f"{where}: expected a mapping of sparsify parameters")
        if "method" in over:
            raise ConfigError(f"{where}.method: the sparsify method is one for every model")
        for k in over:
            if k in SHARED_SPARSIFY:
                raise ConfigError(f"{where}.{k}: the same for every model (set it in sparsify)")
            if method.param(k) is None:
                takes = ", ".join(p.name for p in method.params if p.name not in SHARED_SPARSIFY)
                raise ConfigError(
                    f"{where}.{k}: sparsify.method {method.name} takes no {k} "
                    f"(per model: {takes or 'nothing'})"
                )
        values, _ = methods.parse_params(method, {**base_values, **over}, where, shared)
        tasks.append(tuple((k, values[k]) for k in over))
    if not any(tasks):
        return sparsify
    return replace(sparsify, tasks=tuple(tasks))
