"""The method registry: what a sparsifier or a combiner declares, and the lookup.

A method is one module of this package that defines ``METHOD`` (a
:class:`Sparsifier` or a :class:`Combiner`). The registry finds them by
listing the package, so adding a method is adding a file: its parameters give
the config schema, its validation and the help text (``tadmerge methods``,
the README's reference); its block function is the torch reference on every
device; its working set per element sizes the plan's units.

Method modules import no torch at module level: the config, the planner and
the torch-free merges (engine/stream.py, engine/raw.py) read the declarations,
and a merge that never needs torch never loads it.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from ..errors import ConfigError
from ..schema import check_bool, check_choice, check_int, check_number

NONE = "none"  # the sparsifier family of "keep everything"
MAGNITUDE = "magnitude"  # keeps ranks [lo, hi) of |τ| (exact statistics, engine/selection.py)
RANDOM = "random"  # keeps entries by a random stream keyed by tensor and canonical block


@dataclass(frozen=True)
class Param:
    """One config parameter of a method: its key, default, range and help."""

    name: str
    default: Any
    help: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] | None = None
    # a number that may vary per tensor, in mergekit's forms: a gradient over the
    # layers (a list of numbers), or {filter, value} entries (see tensor_value).
    # None: every number parameter (a float default, no choices) may, as in
    # mergekit, where every numeric parameter is evaluated per tensor
    per_tensor: bool | None = None

    def __post_init__(self) -> None:
        if self.per_tensor is None:
            number = isinstance(self.default, float) and self.choices is None
            object.__setattr__(self, "per_tensor", number)

    def parse(self, value: Any, where: str) -> Any:
        """The value checked against the declaration (ConfigError naming `where`)."""
        if self.per_tensor and not isinstance(value, int | float):
            return self._parse_per_tensor(value, where)
        if self.choices is not None:
            return check_choice(value, where, frozenset(self.choices))
        if isinstance(self.default, bool):
            return check_bool(value, where)
        if isinstance(self.default, int):
            return check_int(value, where, int(self.lo or 0))
        return check_number(value, where, self.lo, self.hi, self.lo_open, self.hi_open)

    def _parse_per_tensor(self, value: Any, where: str) -> Any:
        """A gradient (list of numbers) or a list of {filter, value} entries, each
        value a number or a gradient; returned as plain lists and dicts."""

        def number_or_gradient(v: Any, at: str) -> Any:
            if isinstance(v, list):
                if not v:
                    raise ConfigError(f"{at}: an empty gradient")
                return [
                    check_number(x, f"{at}[{i}]", self.lo, self.hi, self.lo_open, self.hi_open)
                    for i, x in enumerate(v)
                ]
            return check_number(v, at, self.lo, self.hi, self.lo_open, self.hi_open)

        if isinstance(value, dict):
            value = [value]
        if isinstance(value, list) and value and all(isinstance(e, dict) for e in value):
            out = []
            for i, e in enumerate(value):
                at = f"{where}[{i}]"
                if "value" not in e or set(e) - {"value", "filter"}:
                    raise ConfigError(f"{at}: expected {{filter, value}}")
                f = e.get("filter")
                if f is not None and not isinstance(f, str):
                    raise ConfigError(f"{at}.filter: expected a string, got {f!r}")
                out.append({"filter": f, "value": number_or_gradient(e["value"], f"{at}.value")})
            return out
        return number_or_gradient(value, where)

    def describe(self) -> str:
        """'0 <= x <= 1, default 0.5': the range and default, as the help shows them."""
        if self.choices is not None:
            kind = " | ".join(self.choices)
        elif isinstance(self.default, bool):
            kind = "true | false"
        else:
            lo = "" if self.lo is None else f"{_num(self.lo)} {'<' if self.lo_open else '<='} "
            hi = "" if self.hi is None else f" {'<' if self.hi_open else '<='} {_num(self.hi)}"
            kind = f"{lo}x{hi}" if lo or hi else "number"
        per = "; per tensor: a gradient or {filter, value} entries" if self.per_tensor else ""
        return f"{kind}; default {_num(self.default)}{per}"


_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The transformer layer a tensor belongs to (`model.layers.7.mlp...` is 7), or
    None for the others (embeddings, the final norm, the head)."""
    m = _LAYER.search("." + name)
    return int(m.group(1)) if m else None


def tensor_value(setting: Any, name: str, layers: int) -> float:
    """A per-tensor parameter's value for tensor `name` (mergekit's rule): the
    first {filter, value} entry whose filter is a substring of the name (or has
    none, or '*') applies; a gradient is interpolated linearly at layer i of
    `layers` at i / (layers − 1) (1 for a single layer), and taken at 0 for a
    tensor outside the layers."""
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        for e in setting:
            f = e["filter"]
            if f is None or f == "*" or f in name:
                return tensor_value(e["value"], name, layers)
        raise ConfigError(f"{name}: no filter entry applies (add one without a filter)")
    if not isinstance(setting, list):
        return float(setting)
    i = layer_of(name)
    pos = 0.0 if i is None else (i / (layers - 1) if layers > 1 else 1.0)
    scaled = pos * (len(setting) - 1)
    i0 = int(scaled)
    i1 = min(len(setting) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * setting[i0] + frac * setting[i1]


def varies(setting: Any) -> bool:
    """Whether a parsed parameter value may differ per tensor (a gradient or
    {filter, value} entries), rather than one number for every tensor."""
    return isinstance(setting, list | dict)


def resolve_values(
    values: Mapping[str, Any], name: str, layers: int
) -> tuple[dict[str, Any], bool]:
    """`values` with every per-tensor setting replaced by its number for tensor
    `name` (tensor_value), and whether any was per tensor. Plain Python floats:
    every executor, split and worker count computes the same number."""
    out = dict(values)
    changed = False
    for k, v in values.items():
        if varies(v):
            out[k] = tensor_value(v, name, layers)
            changed = True
    return out, changed


def check_resolved(method: Method, values: Mapping[str, Any], where: str, name: str) -> None:
    """A method's cross-parameter rule on the values tensor `name` resolved to
    (parse_params defers it when a value is per tensor): a ConfigError naming
    the tensor."""
    problem = method.check(values, where)
    if problem:
        raise ConfigError(f"{problem} (at tensor {name})")


def _num(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if not isinstance(v, str) else v


@dataclass(frozen=True)
class Method:
    """What every method declares."""

    name: str
    summary: str  # one line: what it does (help text and the README's reference)
    params: tuple[Param, ...] = ()
    # extra bytes per element of a unit's working set, given K tasks, beyond the
    # K+1 float32 blocks, a raw block and the output cast (planners/plan.py)
    extra_bytes: Callable[[int], int] = field(default=lambda k: 0)
    # per-task figures it adds to merge_report.json's tensors, beyond those of every
    # merge (n, kept, drop_rate, norm, norm_after): report/figures.py fills them
    report_fields: tuple[str, ...] = ()
    # cross-parameter constraints: check(values, section) is a message naming the
    # keys (as f"{section}.key"), or None
    check: Callable[[Mapping[str, Any], str], str | None] = field(
        default=lambda values, where: None
    )

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


@dataclass(frozen=True)
class Sparsifier(Method):
    """Φ: turns a task vector τ into t. `family` says which machinery serves it."""

    family: str = NONE
    # magnitude family: keep_range(n, spec, rate) is the kept rank range [lo, hi)
    # of |τ| in ascending order; drop_rate(index, spec), where the method has one
    # of its own (TADrop), resolves it from the exact histograms: a generator
    # that yields the coarse buckets whose fine histograms it still needs and
    # returns (rate, Q_low, Q_high) (engine/selection.py drives both)
    keep_range: Callable[..., tuple[int, int]] | None = None
    drop_rate: Callable[..., Any] | None = None
    # random family: block(tau, u, spec, row_len[, backend]) -> (t, kept) with u
    # the block's uniform draws; whole_rows: it needs whole rows at once (and is
    # given the merge's kernels backend), else it is applied chunk by chunk
    block: Callable[..., Any] | None = None
    whole_rows: bool = False


@dataclass(frozen=True)
class Combiner(Method):
    """Combines the K sparsified task vectors of one block with the base.

    `merge_block(base, taus, plans, spec, ctx, sparsify, chunks, check_finite)`
    is the torch reference (engine/block.py calls it after phase one, with
    τ_k made in place in `taus` and `sparsify(a, b)` giving t_k[a:b]);
    `cross_block` names what it needs from the whole tensor beyond the
    sparsifier's statistics (TIES: the majority sign of a split tensor).

    Its whole-tensor statistics, exact for any split, are one declaration:
    `statistics(spec, shape, name)`, a generator that yields typed requests
    (engine/spec.py), is sent each one's answer over the whole tensor and
    returns plain data (JSON; or an engine/sums.py Combination) that every block
    of the tensor is given as BlockContext.tensor_stats["values"]:
    - ScoreRequest(signed, buckets): the exact histograms of its derived
      per-element `score(base, ts, spec, shape)` (float32, fixed order, whole
      rows of a tensor of `shape`), sent back as the tensor's RankIndex with
      the fine histograms of `buckets` (exact order statistics: arcee_fusion's
      quantiles);
    - CutRequest(lo, hi): keep the ranks [lo, hi) of the ascending score order
      (ties by flat index) in every t_k, one cut for all (sce's variance
      selection; an unsigned score, one cut per tensor); the requests after it
      see the cut t_k, and the blocks apply it (BlockContext.tensor_stats["cut"]);
    - SumsRequest(vectors, pairs, layout): exact sums of products per segment of
      the weights or the t_k, sent back as float64 (slerp's norms and dot
      product, sce's Σ t_k²);
    - CountRequest(): exact counts of its per-element indicators,
      `counts(ts, spec, backend)` of a block's t_k (int64 per indicator: the
      torch reference, or its C twin on the merge's backend), added over the
      blocks (ramplus_tl's shared and unique entries).
    The block runs the generator on itself when it holds the tensor
    (engine/tensor_stats.py resolve); cluster/tensor_stats.py runs it as
    map/reduce rounds over the units of a split tensor. A combiner without a
    merge_block merges the weights (merge_weights(base, models, spec,
    check_finite, ctx)) and takes no sparsifier.
    """

    merge_block: Callable[..., Any] | None = None
    # merge_weights(base, models, spec, check_finite, ctx): the block when there is no
    # sparsifier and the method then works on the weights, not on task vectors
    merge_weights: Callable[..., Any] | None = None
    cross_block: tuple[str, ...] = ()
    # whole-tensor statistics (see above): the generator, the score it ranks, the
    # indicators it counts
    statistics: Callable[..., Any] | None = None
    score: Callable[..., Any] | None = None
    counts: Callable[..., Any] | None = None
    # how many models it merges (besides the base): (least, most or None)
    models: tuple[int, int | None] = (1, None)
    # it works on whole rows of the last dimension, and a 1-D tensor is one row:
    # the planner never splits a 1-D tensor (as for DELLA's ranks)
    whole_rows: bool = False
    # its math reads the models' weights (models[i].weight); False: it ignores them,
    # and the config parser warns where one is not 1 (mergekit's front end then
    # reads none, as mergekit does)
    uses_weights: bool = True


@cache
def _load() -> tuple[dict[str, Sparsifier], dict[str, Combiner]]:
    sparsifiers: dict[str, Sparsifier] = {}
    combiners: dict[str, Combiner] = {}
    package = importlib.import_module(__package__)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name == "registry":
            continue
        module = importlib.import_module(f"{__package__}.{info.name}")
        method = getattr(module, "METHOD", None)
        table: dict = sparsifiers if isinstance(method, Sparsifier) else combiners
        if not isinstance(method, Sparsifier | Combiner):
            raise TypeError(f"{module.__name__}: METHOD must be a Sparsifier or a Combiner")
        if method.name in table:
            raise TypeError(f"{module.__name__}: method {method.name!r} is registered twice")
        table[method.name] = method
    return sparsifiers, combiners


def sparsifiers() -> dict[str, Sparsifier]:
    return _load()[0]


def combiners() -> dict[str, Combiner]:
    return _load()[1]


def sparsifier(name: str) -> Sparsifier:
    return sparsifiers()[name]


def combiner(name: str) -> Combiner:
    return combiners()[name]


def family(name: str) -> frozenset[str]:
    """The names of the sparsifiers of one family (MAGNITUDE, RANDOM, NONE)."""
    return frozenset(n for n, s in sparsifiers().items() if s.family == name)


def parse_params(
    method: Method, section: Mapping[str, Any], where: str, shared: Mapping[str, Param]
) -> tuple[dict[str, Any], list[str]]:
    """A config section's parameters for `method`: declared ones checked (defaults
    filled in), and the keys it set that this method does not take (a warning:
    today's configs may carry another method's keys)."""
    values: dict[str, Any] = {}
    for p in method.params:
        values[p.name] = p.parse(section.get(p.name, p.default), f"{where}.{p.name}")
    ignored = sorted(k for k in section if k != "method" and method.param(k) is None)
    for k in ignored:  # still checked, so a bad value is an error whatever the method
        if k in shared:
            shared[k].parse(section[k], f"{where}.{k}")
    # (a per-tensor value is checked with the others once resolved for each tensor:
    # engine/spec.py, when the plan is made)
    problem = None if any(varies(v) for v in values.values()) else method.check(values, where)
    if problem:
        raise ConfigError(problem)
    return values, ignored


def all_params(methods: Mapping[str, Method]) -> dict[str, Param]:
    """Every parameter any of `methods` declares, by key (first declaration wins)."""
    out: dict[str, Param] = {}
    for m in methods.values():
        for p in m.params:
            out.setdefault(p.name, p)
    return out


IGNORES_WEIGHTS = "ignores the models' weight (models[i].weight)"


def describe(methods: Mapping[str, Method]) -> Iterator[str]:
    """Help text lines: each method, its summary and its parameters."""
    for m in methods.values():
        yield f"{m.name}: {m.summary}"
        if not getattr(m, "uses_weights", True):
            yield f"    {IGNORES_WEIGHTS}"
        for p in m.params:
            yield f"    {p.name}: {p.help} ({p.describe()})"


def reference_markdown() -> str:
    """The README's method reference (between its `methods:begin/end` markers):
    generated here so that the two cannot drift (tests/test_methods_registry.py)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = []
    for section, table in (("sparsify", sparsifiers()), ("merge", combiners())):
        lines += [
            f"`{section}.method`:",
            "",
            "| method | what it does | parameters |",
            "|---|---|---|",
        ]
        for name in sorted(table):
            m = table[name]
            params = "<br>".join(f"`{p.name}`: {p.help} ({p.describe()})" for p in m.params)
            what = m.summary + ("" if getattr(m, "uses_weights", True) else f"; {IGNORES_WEIGHTS}")
            lines.append(f"| `{name}` | {cell(what)} | {cell(params) or '—'} |")
        lines.append("")
    return "\n".join(lines)


_README_BLOCK = re.compile(r"(<!-- methods:begin[^\n]*-->\n)(.*?)(<!-- methods:end -->)", re.S)


def update_readme(path: str) -> bool:
    """Rewrite the README's generated method reference; True if it changed."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    new = _README_BLOCK.sub(lambda m: m.group(1) + reference_markdown() + m.group(3), text)
    if new != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
    return new != text
