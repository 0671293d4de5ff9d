"""What a merge asks of the engine: the specs, and the statistics requests.

Plain data, no torch: the config, the planner and the streamed merges
(engine/stream.py) read these, and a merge that only streams never loads torch
(whose start-up costs more than the whole I/O of a small merge).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .. import methods
from ..errors import ConfigError

if TYPE_CHECKING:
    from .selection import Selection

# the sparsifiers that select by magnitude, as the registry declares them (methods/)
MAGNITUDE_METHODS = methods.family(methods.MAGNITUDE)


@dataclass(frozen=True)
class SparsifySpec:
    """Parameters of Φ, as resolved from the config (defaults filled in).

    A number parameter may hold a per-tensor setting (a gradient over the layers
    or {filter, value} entries, methods/registry.py tensor_value) until
    for_tensor resolves it; the engine is only ever given resolved specs.
    """

    method: str = "none"
    scope: str = "tensor"
    low_q: float = 0.5
    high_q: float = 0.95
    eps: float = 1e-12
    rescale: str = "none"
    max_drop: float = 1.0
    density: float = 0.2
    p: float = 0.9
    epsilon: float = 0.1
    gamma: float = 0.01
    # per task, the parameters set for that task alone (models[i].sparsify,
    # tadmerge/slices.py): ((name, value), ...) per task; () when none is
    tasks: tuple[tuple[tuple[str, float], ...], ...] = ()

    def for_task(self, k: int) -> SparsifySpec:
        """The spec task k is sparsified with: its own values where it has some."""
        if not self.tasks or not self.tasks[k]:
            return self
        return replace(self, tasks=(), **dict(self.tasks[k]))

    @property
    def per_tensor(self) -> bool:
        """Whether some value (its own or a task's) differs per tensor."""
        own = (getattr(self, p.name) for p in methods.sparsifier(self.method).params)
        return any(methods.varies(v) for v in own) or any(
            methods.varies(v) for task in self.tasks for _, v in task
        )

    def for_tensor(self, name: str, layers: int) -> SparsifySpec:
        """The spec tensor `name` is sparsified with: every per-tensor value (the
        section's and each task's own) resolved to its number there, and the
        method's cross-parameter rule checked on what each task gets
        (ConfigError naming the tensor). Unchanged when nothing varies."""
        if not self.per_tensor:
            return self
        method = methods.sparsifier(self.method)
        own = {p.name: getattr(self, p.name) for p in method.params}
        values, _ = methods.resolve_values(own, name, layers)
        tasks = tuple(
            tuple(methods.resolve_values(dict(task), name, layers)[0].items())
            for task in self.tasks
        )
        out = replace(self, tasks=tasks, **values)
        for k in range(max(1, len(tasks))):
            task = out.for_task(k) if tasks else out
            where = f"models[{k}].sparsify" if tasks and tasks[k] else "sparsify"
            methods.check_resolved(
                method, {p.name: getattr(task, p.name) for p in method.params}, where, name
            )
        return out

    @property
    def moments(self) -> int:
        """Exact moments the selection needs: 2 for l2, 1 for l1, else counts only."""
        return {"l2": 2, "l1": 1}.get(self.rescale, 0)


@dataclass(frozen=True)
class MergeSpec:
    sparsify: SparsifySpec
    method: str  # a combiner of the registry (methods/)
    scale: float = 1.0
    disjoint: str = "mean"
    weights: tuple[float, ...] = ()
    seed: int = 0
    # every parameter the combiner declares, by name (scale and disjoint too)
    params: tuple[tuple[str, object], ...] = ()
    layers: int = 0  # transformer layers of the model (per-tensor parameters' gradients)

    def param(self, name: str):
        return dict(self.params)[name]

    @property
    def compiled_combiner(self) -> str | None:
        """The combiner the compiled CPU paths (engine/stream.py, engine/raw.py)
        merge this spec as: "task_arithmetic", or "average" for averaging and for
        linear with normalize (the same torch functions: methods/linear.py); None
        for every other combiner."""
        if self.method == "linear":
            return "average" if dict(self.params).get("normalize", True) else None
        return self.method if self.method in ("task_arithmetic", "average") else None

    @property
    def per_tensor(self) -> bool:
        """Whether some value (the combiner's, a weight, the sparsifier's) differs
        per tensor."""
        return (
            any(methods.varies(v) for _, v in self.params)
            or any(methods.varies(w) for w in self.weights)
            or self.sparsify.per_tensor
        )

    def for_tensor(self, name: str) -> MergeSpec:
        """The spec tensor `name` is merged with: the sparsifier's, the combiner's
        and the models' per-tensor values (gradients over `layers`, {filter,
        value} entries) resolved to plain numbers, before any math, so that every
        split, executor and worker count gives the same bytes. The one place a
        merge's values are resolved per tensor (cluster/worker.py merge_spec).
        Unchanged when nothing varies."""
        if not self.per_tensor:
            return self
        params, p_var = methods.resolve_values(dict(self.params), name, self.layers)
        w = dict(enumerate(self.weights))
        weights, w_var = methods.resolve_values(w, name, self.layers)
        sparsify = self.sparsify.for_tensor(name, self.layers)
        combiner = methods.combiner(self.method)
        if p_var:
            methods.check_resolved(combiner, params, "merge", name)
        ws = tuple(weights[k] for k in range(len(self.weights)))
        normalized = self.method == "average" or params.get("normalize", False)
        if w_var and normalized and sum(ws) == 0:
            raise ConfigError(
                f"models[*].weight: the weights of {self.method} must not sum to 0 "
                f"(it divides by it; at tensor {name})"
            )
        return replace(
            self,
            sparsify=sparsify,
            weights=ws,
            params=tuple(params.items()),
            scale=params.get("scale", self.scale),
        )


# The map steps of the statistics stage (cluster/stats.py): what one unit is asked
# for in one round. Each is answered per task and reduced by the driver by adding.


@dataclass(frozen=True)
class CoarseRequest:
    """Per task: the coarse histogram of |τ|'s keys, with `moments` exact moments,
    and (`keys_aside`) the block's keys with low bits when they are few."""

    moments: int
    keys_aside: bool = False


@dataclass(frozen=True)
class FineRequest:
    """Per task: the fine histograms of the coarse buckets the resolvers asked for."""

    buckets: dict[int, list[int]]  # task -> coarse buckets


@dataclass(frozen=True)
class TieCountRequest:
    """Per task: how many entries of the block equal each cut key."""

    keys: dict[int, list[int]]  # task -> cut keys


# A combiner's whole-tensor statistics (methods/registry.py Combiner.statistics):
# what its generator yields, each answered with numbers of the whole tensor.


@dataclass(frozen=True)
class ScoreRequest:
    """The exact histograms of the combiner's derived score (Combiner.score): the
    generator is sent the tensor's RankIndex, with the fine histograms of
    `buckets`; a unit answers its coarse histogram (no buckets), the fine ones
    of `buckets`, or its count of each of `keys` (tie shares). `signed`: the
    score may be negative (32-bit order keys, engine/signed.py)."""

    signed: bool = False
    buckets: tuple[int, ...] = ()
    keys: tuple[int, ...] = ()


@dataclass(frozen=True)
class CutRequest:
    """Keep the ranks [lo, hi) of the ascending score order (ties by flat index)
    in every task's t_k, one cut for all; the requests after it see the cut t_k.
    Sent back: None."""

    lo: int
    hi: int


@dataclass(frozen=True)
class SumsRequest:
    """Exact sums of products (engine/sums.py): per pair (i, j), Σ v_i·v_j over
    each segment, with v_0 the base and v_k model k's weights ("weights") or its
    task vector t_k ("tasks"); segments by `layout` ("tensor", "first": vectors
    along the first axis, "last"). Sent back: float64 [S pairs, C segments]."""

    vectors: str
    pairs: tuple[tuple[int, int], ...]
    layout: str = "tensor"


@dataclass(frozen=True)
class CountRequest:
    """Exact counts over the tensor of the combiner's per-element indicators
    (Combiner.counts of each block's t_k: int64 per indicator), added over the
    blocks. Sent back: int64 [indicators]."""


@dataclass(frozen=True)
class UnitRequest:
    """One unit's share of a round of a combiner's statistics: `request` answered
    on its t_k as the merge makes them (`resolved`: its sparsifier's context) after
    the tensor's cut so far (`cut`: [lo_key, lo_quota, hi_key, hi_quota], its share)."""

    request: ScoreRequest | SumsRequest | CountRequest
    resolved: dict | None = None
    cut: tuple[int, int, int, int] | None = None


StatsRequest = CoarseRequest | FineRequest | TieCountRequest | UnitRequest


class NonFiniteTaskVector(ValueError):
    """τ_k of this block holds NaN or Inf (the worker names the files)."""

    def __init__(self, task: int):
        super().__init__(task)
        self.task = task


@dataclass
class TaskStats:
    """What one block tells the report about one task (SPEC section 7)."""

    kept: int = 0
    selection: Selection | None = None  # when the block resolved the whole tensor
    tau_sq: float = 0.0  # Σ τ² of the block, float64 (report only)
    t_sq: float = 0.0  # Σ t² of the block, float64 (report only)


@dataclass
class BlockContext:
    """Where the block sits and what the group statistics already decided."""

    tensor: str
    shape: tuple[int, ...]
    row_start: int
    row_end: int
    rng_rows: int
    whole: bool
    # per task, a Selection resolved over the whole tensor or the whole task vector
    selections: list[Selection | None] | None = None
    # per task, the block's quotas of ties below the lo and hi cuts
    quotas: list[tuple[int, int]] | None = None
    # per task, TADrop drop rates decided globally (scope: global)
    rates: list[float] | None = None
    majority: int | None = None
    # a combiner's whole-tensor statistics of a split tensor, resolved by the driver
    # (cluster/tensor_stats.py): {"cut": the unit's cut or None, "values": what its
    # generator returned, JSON}; None when the block resolves them (engine/tensor_stats.py)
    tensor_stats: dict | None = None

    # the kernels backend the merge's driver decided (cluster/dispatch.py): c | torch
    # (auto: the C kernels where they load, for callers outside a merge)
    backend: str = "auto"

    def selection(self, k: int) -> Selection | None:
        """Task k's selection resolved over its tensor, or None: the block resolves
        its own (selection.own_selection)."""
        return self.selections[k] if self.selections else None

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def della_row(self) -> int:
        """DELLA ranks within rows; 0-d and 1-D tensors are one row."""
        if len(self.shape) <= 1:
            return max(1, self.shape[0] if self.shape else 1)
        return self.row_numel
