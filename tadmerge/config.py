"""The merge config: YAML in, validated dataclasses out.

The key names are the user interface (README "Config reference"). Unknown keys
and bad values raise ConfigError naming the key and why, so a typo never turns
into a silently different merge.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from . import methods
from .engine.spec import SparsifySpec
from .errors import ConfigError
from .schema import MAX_INT, check_bool, check_choice, check_int, check_number, show
from .slices import PASSTHROUGH, Slice, parse_slices, parse_task_sparsify, slices_to_list

log = logging.getLogger("tadmerge")
OUTPUT_DTYPES = {"auto", "float32", "bfloat16", "float16", "float64"}
DELTA_DTYPES = {"float32", "bfloat16", "float16"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40,
}  # fmt: skip


_MAX_INT = MAX_INT


def parse_size(value: Any, key: str) -> int:
    """'5GB' (decimal, as Hugging Face writes shard sizes), '512MiB', or bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size like '2GB', got {show(value)}")
    if isinstance(value, int):
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {show(value)}")
        if value >= _MAX_INT:
            raise ConfigError(f"{key}: must be below 2**63 bytes, got {show(value)}")
        return value
    m = _SIZE_RE.match(value) if isinstance(value, str) and len(value) <= 64 else None
    if not m or (m.group(2) or "").lower() not in _UNITS:
        raise ConfigError(f"{key}: expected a size like '2GB' or '512MiB', got {show(value)}")
    size = float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]
    if not size < _MAX_INT or int(size) <= 0:
        raise ConfigError(f"{key}: must be positive and below 2**63 bytes, got {show(value)}")
    return int(size)


def size_is_binary(n: int) -> bool:
    """Whether a size was most likely written in binary units (MiB, GiB): a whole
    number of MiB. A decimal size ('64MB', '1GB', '512MB') never is one below
    2**20 MB, so messages can answer in the notation the user typed."""
    return n > 0 and n % 2**20 == 0


def format_size(n: float, binary: bool, *, up: bool = False) -> str:
    """'64 MB' / '61.1 MiB': at most one decimal; `up` rounds up (for a minimum, so
    that the value shown, typed back, is enough)."""
    units = ("KiB", "MiB", "GiB", "TiB") if binary else ("kB", "MB", "GB", "TB")
    step = 1024 if binary else 1000
    if n < step:
        return f"{int(n)} bytes"
    value, unit = n / step, units[0]
    for u in units[1:]:
        if value < step:
            break
        value, unit = value / step, u
    tenths = math.ceil(round(value * 10, 6)) if up else round(value * 10)
    return f"{tenths // 10}" + (f".{tenths % 10}" if tenths % 10 else "") + f" {unit}"


@dataclass(frozen=True)
class ModelEntry:
    path: str
    name: str
    # a number, or per tensor a gradient over the layers or {filter, value} entries
    # (methods/registry.py tensor_value; resolved per tensor by MergeSpec.for_tensor)
    weight: Any = 1.0


@dataclass(frozen=True)
class MergeMethod:
    """merge.method and the values of the parameters its combiner declares
    (methods/), in declaration order."""

    method: str = "task_arithmetic"
    params: tuple[tuple[str, Any], ...] = (("scale", 1.0),)

    def get(self, name: str, default: Any = None) -> Any:
        return dict(self.params).get(name, default)

    def to_dict(self) -> dict:
        return {"method": self.method, **dict(self.params)}


@dataclass(frozen=True)
class OutputSpec:
    path: str = "out"
    dtype: str = "auto"
    shard_size: int = 5 * 10**9
    # keep the last N published outputs as dated siblings (`<path>.<UTC time>`), `path`
    # a symlink to the newest (io/publish.py); 0: one output at `path`, replaced
    keep: int = 0
    # after publishing, upload the output to this Hugging Face repo (io/hub_push.py);
    # created private unless hub_private is false. Not part of the plan fingerprint.
    push_to_hub: str | None = None
    hub_private: bool = True
    # the push deletes the repo's weight files the output lacks (in the upload's
    # commit) instead of refusing: an older model.safetensors under new shards...
    hub_replace_weights: bool = False


@dataclass(frozen=True)
class RuntimeSpec:
    executor: str = "local"
    workers: int | None = None  # None: auto (local: one per core, up to AUTO_WORKERS_MAX)
    device: str = "auto"
    memory_budget: int = 512 * 10**6  # larger budgets were no faster: docs/benchmarks.md
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None  # default: 1 when device is cuda
    # working memory of a unit on a GPU (default: memory_budget, applied to the GPU)
    gpu_memory_budget: int | None = None
    max_retries: int = 3
    # ray: seconds a worker (first or replacement) may take to be scheduled and started
    # before it is given up, its units going to the others (a lost node leaves no room)
    worker_start_timeout: float = 120.0
    # skip the merge (exit 0, "up to date") when the inputs and the config are those the
    # published output was made from (run/inputs.py changed_since); else replace it
    if_changed: bool = False
    progress: str = "auto"  # auto | bar | log | none
    # CPU kernels: auto (TADMERGE_KERNELS, else the C kernels where they build, the
    # torch reference elsewhere) | c (required) | torch; numba: deprecated, taken as
    # auto (cluster/dispatch.py). Never changes the output bytes (engine/kernels.py).
    kernels: str = "auto"
    # Advanced. Cap on the elements of one unit (smaller units than the budget allows).
    max_unit_elements: int | None = None
    # Advanced. Elements per canonical row block: the grain of DARE/DELLA random streams
    # and of EMR mask chunks, so it is part of the output's definition.
    block_elements: int = 1 << 20

    def local_workers(self) -> int:
        """Worker threads of the local executor: as set, or one per available core,
        at most AUTO_WORKERS_MAX and at most one per AUTO_WORKER_BUDGET of the
        budget (each worker gets memory_budget / workers: smaller units would split
        more tensors, and split tensors need statistics rounds)."""
        if self.workers is not None:
            return self.workers
        by_budget = self.memory_budget // AUTO_WORKER_BUDGET
        return max(1, min(available_cpus(), AUTO_WORKERS_MAX, by_budget))


AUTO_WORKERS_MAX = 4
AUTO_WORKER_BUDGET = 256 * 10**6


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class InputPolicy:
    allow_pickle: bool = False
    allow_nonfinite: bool = False


@dataclass(frozen=True)
class EmrSpec:
    delta_dtype: str = "float32"


@dataclass(frozen=True)
class TokenizerSpec:
    """The output's vocabulary (planners/vocabulary.py): `base` (the base's rows and
    tokenizer files, a fine-tune's rows beyond them dropped), `union` (the base's
    tokens, then every model's tokens it lacks), or a model's name (its tokenizer)."""

    source: str = "base"


@dataclass(frozen=True)
class MergeConfig:
    base: str
    models: tuple[ModelEntry, ...]
    sparsify: SparsifySpec = field(default_factory=SparsifySpec)
    merge: MergeMethod = field(default_factory=MergeMethod)
    exclude: tuple[str, ...] = ()
    output: OutputSpec = field(default_factory=OutputSpec)
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)
    inputs: InputPolicy = field(default_factory=InputPolicy)
    emr: EmrSpec = field(default_factory=EmrSpec)
    seed: int = 0
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    # layer stacking (tadmerge/slices.py): the output's layers, slice by slice; () for none
    slices: tuple[Slice, ...] = ()

    @property
    def task_names(self) -> list[str]:
        return [m.name for m in self.models]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["models"] = [asdict(m) for m in self.models]
        d["merge"] = self.merge.to_dict()
        d["exclude"] = list(self.exclude)
        # (left out when unused: a config without them writes the same merge_config.yaml)
        tasks = d["sparsify"].pop("tasks")
        for m, over in zip(d["models"], tasks or (), strict=False):
            if over:
                m["sparsify"] = dict(over)
        if self.slices:
            d["slices"] = slices_to_list(self.slices)
        else:
            del d["slices"]
        # (the nightly switches at their defaults are left out: a config that does not
        # use them writes the same merge_config.yaml as before they existed)
        if not d["output"]["keep"]:
            del d["output"]["keep"]
        if d["output"]["push_to_hub"] is None:
            del d["output"]["push_to_hub"]
        if d["output"]["hub_private"]:
            del d["output"]["hub_private"]
        if not d["output"]["hub_replace_weights"]:
            del d["output"]["hub_replace_weights"]
        if not d["runtime"]["if_changed"]:
            del d["runtime"]["if_changed"]
        if self.tokenizer.source == "base":  # (the default: the same yaml as before it)
            del d["tokenizer"]
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------

_TOP_KEYS = {"base", "models", "sparsify", "merge", "exclude", "output", "runtime", "seed",
             "inputs", "emr", "tokenizer", "slices"}  # fmt: skip
_SPARSIFY_PARAMS = methods.all_params(methods.sparsifiers())
WEIGHT = methods.Param("weight", 1.0, "the model's weight")  # (a number, or per tensor)
_MERGE_PARAMS = methods.all_params(methods.combiners())


def _check_keys(section: dict, allowed: set[str], where: str) -> None:
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(section).__name__}")
    unknown = sorted((k for k in section if k not in allowed), key=str)
    if unknown:
        shown = ", ".join(show(k) for k in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise ConfigError(
            f"{where}: unknown key(s) {shown}{more}; allowed: {', '.join(sorted(allowed))}"
        )


def _section(raw: dict, key: str, empty: Any) -> Any:
    """A section's value, `empty` when absent or null (any other value is checked)."""
    value = raw.get(key)
    return empty if value is None else value


def _string(value: Any, key: str, what: str) -> str:
    """A required non-empty string (a path, a name): anything else names the key."""
    if value is None or value == "":
        raise ConfigError(f"{key}: required ({what})")
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string ({what}), got {type(value).__name__}")
    if "\x00" in value:
        raise ConfigError(f"{key}: contains a NUL character: {show(value)}")
    return value


_num = check_number
_choice = check_choice
_int = check_int
_bool = check_bool


def _parse_models(raw: Any, base_dir: Path) -> tuple[ModelEntry, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("models: expected a non-empty list of {path, name, weight}")
    out, seen = [], set()
    for i, m in enumerate(raw):
        if isinstance(m, str):
            m = {"path": m}
        # (sparsify: the model's own sparsifier values, parsed with the section)
        _check_keys(m, {"path", "name", "weight", "sparsify"}, f"models[{i}]")
        raw_path = _string(m.get("path"), f"models[{i}].path", "a directory, a file or a repo id")
        path = _resolve_path(raw_path, base_dir, f"models[{i}].path")
        if m.get("name") is None:
            name = Path(raw_path.rstrip("/")).name.split("@")[0]
        else:
            name = _string(m["name"], f"models[{i}].name", "a task name")
        if not _NAME_RE.match(name):
            raise ConfigError(
                f"models[{i}].name: {show(name)} must be 1-128 chars of letters, digits, "
                "'_', '.', '-'"
            )
        if name in seen:
            raise ConfigError(f"models[{i}].name: {name!r} is used twice; names must be unique")
        seen.add(name)
        weight = WEIGHT.parse(m.get("weight", 1.0), f"models[{i}].weight")
        out.append(ModelEntry(path, name, weight))
    return tuple(out)


def _resolve_path(p: str, base_dir: Path, key: str) -> str:
    """Relative local paths are relative to the config file; repo ids stay as they are."""
    try:
        candidate = (base_dir / p).expanduser()
        if Path(p).is_absolute() or candidate.exists() or p.startswith((".", "~")):
            return str(candidate.resolve()) if not Path(p).is_absolute() else p
    except (OSError, RuntimeError) as e:  # a name too long, a symlink loop, ...
        raise ConfigError(f"{key}: unusable path {show(p)}: {getattr(e, 'strerror', e)}") from None
    return p


def _parse_sparsify(raw: dict) -> SparsifySpec:
    """The sparsify section: the method's declared parameters (methods/)."""
    _check_keys(raw, {"method"} | set(_SPARSIFY_PARAMS), "sparsify")
    method = methods.sparsifier(
        _choice(raw.get("method", "none"), "sparsify.method", frozenset(methods.sparsifiers()))
    )
    values, ignored = methods.parse_params(method, raw, "sparsify", _SPARSIFY_PARAMS)
    _warn_ignored("sparsify", method.name, ignored)
    return SparsifySpec(method=method.name, **values)


def _check_combiner_inputs(
    merge: MergeMethod, sparsify: SparsifySpec, models: tuple[ModelEntry, ...]
) -> None:
    """What a combiner declares of its inputs: how many models, and (a combiner
    with no merge_block: it merges the weights) no sparsifier."""
    combiner = methods.combiner(merge.method)
    least, most = combiner.models
    n = len(models)
    if models and (n < least or (most is not None and n > most)):
        want = f"exactly {least}" if least == most else f"at least {least}"
        if most is not None and least != most:
            want = f"{least} to {most}"
        raise ConfigError(
            f"models: {merge.method} merges {want} model(s) besides the base, got {n}"
        )
    if combiner.merge_block is None and sparsify.method != "none":
        raise ConfigError(
            f"sparsify.method: {merge.method} merges the weights themselves; it takes no "
            f"sparsifier (got {sparsify.method})"
        )


def _parse_merge(m: Any, models: tuple[ModelEntry, ...]) -> MergeMethod:
    _check_keys(m, {"method"} | set(_MERGE_PARAMS), "merge")
    combiner = methods.combiner(
        _choice(m.get("method", "task_arithmetic"), "merge.method", frozenset(methods.combiners()))
    )
    values, ignored = methods.parse_params(combiner, m, "merge", _MERGE_PARAMS)
    _warn_ignored("merge", combiner.name, ignored)
    merge = MergeMethod(method=combiner.name, params=tuple(values.items()))
    normalized = (
        merge.method == "average"
        or merge.get("normalize", False)
        or merge.get("normalize_weights", False)  # (multislerp)
    )
    fixed = not any(methods.varies(x.weight) for x in models)  # (else checked per tensor)
    if normalized and models and fixed and sum(x.weight for x in models) == 0:
        raise ConfigError(
            f"models[*].weight: the weights of {merge.method} must not sum to 0 (it divides by it)"
        )
    return merge


def _warn_unused_weights(method: str, models: tuple[ModelEntry, ...]) -> None:
    """One WARNING where a combiner that ignores the models' weights (its declaration,
    Combiner.uses_weights) is given a weight other than 1: a user who set one
    expects it to count, and silently it would not."""
    if methods.combiner(method).uses_weights:
        return
    named = [m.name for m in models if not _is_one(m.weight)]
    if named:
        log.warning(
            "merge.method %s ignores the models' weight; models[].weight of %s "
            "(not 1) has no effect (README 'Merge methods')",
            method,
            ", ".join(named),
        )


def _is_one(setting: Any) -> bool:
    """A parsed weight that is 1 for every tensor (a number, a gradient or
    {filter, value} entries)."""
    if isinstance(setting, list):
        return all(_is_one(e) for e in setting)
    if isinstance(setting, dict):
        return _is_one(setting.get("value", 1.0))
    return setting == 1


def _check_global_scope(sparsify: SparsifySpec) -> None:
    """scope: global makes one selection (or one TADrop rate) per task over the
    whole task vector, from one set of values: they cannot differ per tensor."""
    if sparsify.scope != "global" or not sparsify.per_tensor:
        return
    method = methods.sparsifier(sparsify.method)
    keys = [p.name for p in method.params if methods.varies(getattr(sparsify, p.name))]
    keys += [
        f"models[{k}].sparsify.{name}"
        for k, task in enumerate(sparsify.tasks)
        for name, v in task
        if methods.varies(v)
    ]
    raise ConfigError(
        f"sparsify.scope: global selects over the whole task vector with one value per "
        f"task; {', '.join(k if '.' in k else 'sparsify.' + k for k in keys)} must be one "
        "number for every tensor (or use scope: tensor)"
    )


def _warn_ignored(section: str, method: str, keys: list[str]) -> None:
    """Keys of another method: accepted (a config may switch methods and keep them),
    but said, so that nobody believes they took effect."""
    if keys:
        log.warning(
            "%s: %s takes no %s; ignored (its parameters: `tadmerge methods %s`)",
            section,
            method,
            ", ".join(keys),
            method,
        )


def _parse_exclude(exclude: Any) -> tuple[str, ...]:
    if not isinstance(exclude, list) or not all(isinstance(x, str) for x in exclude):
        raise ConfigError("exclude: expected a list of regular expressions")
    for i, pat in enumerate(exclude):
        try:
            re.compile(pat)
        except re.error as e:
            raise ConfigError(
                f"exclude[{i}]: invalid regular expression {show(pat)}: {e}"
            ) from None
    return tuple(exclude)


def _parse_output(o: Any, base_dir: Path) -> OutputSpec:
    _check_keys(o, {"path", "dtype", "shard_size", "keep", "push_to_hub", "hub_private",
                    "hub_replace_weights"}, "output")  # fmt: skip
    push = o.get("push_to_hub")
    if push is not None:
        from .io.hub_push import check_repo_id

        push = check_repo_id(push, "output.push_to_hub")
    private = o.get("hub_private", True)
    if not isinstance(private, bool):
        raise ConfigError(f"output.hub_private: expected true or false, got {private!r}")
    replace_weights = o.get("hub_replace_weights", False)
    if not isinstance(replace_weights, bool):
        raise ConfigError(
            f"output.hub_replace_weights: expected true or false, got {show(replace_weights)}"
        )
    out_path = _string(o.get("path", "out"), "output.path", "a directory path")
    return OutputSpec(
        path=str((base_dir / out_path).resolve()) if not Path(out_path).is_absolute() else out_path,
        dtype=_choice(o.get("dtype", "auto"), "output.dtype", OUTPUT_DTYPES),
        shard_size=parse_size(o.get("shard_size", "5GB"), "output.shard_size"),
        keep=_int(o.get("keep", 0), "output.keep", 0),
        push_to_hub=push,
        hub_private=private,
        hub_replace_weights=replace_weights,
    )


def _parse_runtime(r: Any) -> RuntimeSpec:
    _check_keys(r, {"executor", "workers", "device", "memory_budget", "cpus_per_worker",
                    "gpus_per_worker", "max_retries", "progress", "max_unit_elements",
                    "block_elements", "kernels", "gpu_memory_budget",
                    "worker_start_timeout", "if_changed"}, "runtime")  # fmt: skip
    mue = r.get("max_unit_elements")
    gpus = r.get("gpus_per_worker")
    gpu_budget = r.get("gpu_memory_budget")
    return RuntimeSpec(
        executor=_choice(r.get("executor", "local"), "runtime.executor", {"local", "ray"}),
        workers=_workers(r.get("workers", "auto"), "runtime.workers"),
        device=_choice(r.get("device", "auto"), "runtime.device", {"auto", "cpu", "cuda"}),
        memory_budget=parse_size(r.get("memory_budget", "512MB"), "runtime.memory_budget"),
        cpus_per_worker=_num(r.get("cpus_per_worker", 1.0), "runtime.cpus_per_worker", 0.0),
        gpus_per_worker=None if gpus is None else _num(gpus, "runtime.gpus_per_worker", 0.0),
        gpu_memory_budget=None
        if gpu_budget is None
        else parse_size(gpu_budget, "runtime.gpu_memory_budget"),
        max_retries=_int(r.get("max_retries", 3), "runtime.max_retries", 0),
        worker_start_timeout=_num(
            r.get("worker_start_timeout", 120.0),
            "runtime.worker_start_timeout",
            0.0,
            lo_open=True,
        ),
        if_changed=_bool(r.get("if_changed", False), "runtime.if_changed"),
        progress=_choice(
            r.get("progress", "auto"), "runtime.progress", {"auto", "bar", "log", "none"}
        ),
        max_unit_elements=None if mue is None else _int(mue, "runtime.max_unit_elements", 1),
        block_elements=_int(r.get("block_elements", 1 << 20), "runtime.block_elements", 1),
        kernels=_choice(
            r.get("kernels", "auto"), "runtime.kernels", {"auto", "c", "torch", "numba"}
        ),
    )


def _workers(v: Any, where: str) -> int | None:
    if v is None or v == "auto":
        return None
    return _int(v, where, 1)


def _parse_inputs(i: Any) -> InputPolicy:
    _check_keys(i, {"allow_pickle", "allow_nonfinite"}, "inputs")
    return InputPolicy(
        allow_pickle=_bool(i.get("allow_pickle", False), "inputs.allow_pickle"),
        allow_nonfinite=_bool(i.get("allow_nonfinite", False), "inputs.allow_nonfinite"),
    )


def _parse_emr(e: Any) -> EmrSpec:
    _check_keys(e, {"delta_dtype"}, "emr")
    return EmrSpec(
        delta_dtype=_choice(e.get("delta_dtype", "float32"), "emr.delta_dtype", DELTA_DTYPES)
    )


def _parse_tokenizer(t: Any, models: tuple[ModelEntry, ...]) -> TokenizerSpec:
    _check_keys(t, {"source"}, "tokenizer")
    source = t.get("source", "base")
    names = [m.name for m in models]
    if not isinstance(source, str) or source not in ("base", "union", *names):
        allowed = ", ".join(["base", "union", *names])
        raise ConfigError(
            f"tokenizer.source: expected base, union or a model's name ({allowed}), "
            f"got {show(source)}"
        )
    if "source" in t and source in ("base", "union") and source in names:
        raise ConfigError(
            f"tokenizer.source: {source} is ambiguous: models[{names.index(source)}].name is "
            f"{source!r} too; rename that model"
        )
    return TokenizerSpec(source=source)


def _parse_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not -_MAX_INT <= seed < _MAX_INT:
        raise ConfigError(f"seed: expected a 64-bit integer, got {show(seed)}")
    return seed


def _parse_base(raw: dict, base_dir: Path) -> str:
    what = "a directory, a .safetensors file or a repo id"
    return _resolve_path(_string(raw.get("base"), "base", what), base_dir, "base")


def parse_config(raw: Any, base_dir: str | Path = ".") -> MergeConfig:
    """Validate a config mapping (as loaded from YAML) into a MergeConfig.

    Every section is checked even when an earlier one is wrong, and all problems
    are reported together (the first of each section), on one line.
    """
    base_dir = Path(base_dir)
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping, got {type(raw).__name__}")
    errors: list[str] = []

    def section(fn, *args, default=None):
        try:
            return fn(*args)
        except ConfigError as e:
            errors.append(str(e))
            return default

    section(_check_keys, raw, _TOP_KEYS, "config")
    # passthrough may leave out the base: config.json and the side files then come
    # from the first slice's model
    base = None if _passthrough_without_base(raw) else section(_parse_base, raw, base_dir)
    models = section(_parse_models, raw.get("models"), base_dir, default=())
    before = len(errors)
    sparsify = section(_parse_sparsify, _section(raw, "sparsify", {}), default=SparsifySpec())
    sparsify_ok = len(errors) == before  # (per-model values are checked against it)
    merge = section(_parse_merge, _section(raw, "merge", {}), models, default=MergeMethod())
    exclude = section(_parse_exclude, _section(raw, "exclude", []), default=())
    output = section(_parse_output, _section(raw, "output", {}), base_dir, default=OutputSpec())
    runtime = section(_parse_runtime, _section(raw, "runtime", {}), default=RuntimeSpec())
    inputs = section(_parse_inputs, _section(raw, "inputs", {}), default=InputPolicy())
    emr = section(_parse_emr, _section(raw, "emr", {}), default=EmrSpec())
    seed = section(_parse_seed, raw.get("seed", 0), default=0)
    if sparsify_ok:
        sparsify = section(
            parse_task_sparsify, raw.get("models"), sparsify, _SPARSIFY_PARAMS, default=sparsify
        )
        section(_check_global_scope, sparsify)
    slices = section(_parse_slices, raw, models, merge, sparsify, exclude, output, default=())
    if base is None and slices:
        first = slices[0].sources[0].model
        base = next((m.path for m in models if m.name == first), None)
        if base is None or any(s.model == "base" for sl in slices for s in sl.sources):
            errors.append("base: required where a slice takes 'base'")
    tokenizer = section(
        _parse_tokenizer, _section(raw, "tokenizer", {}), models, default=TokenizerSpec()
    )
    if tokenizer is not None and tokenizer.source != "base" and merge.method == "emr":
        errors.append(
            f"tokenizer.source: {tokenizer.source} is not supported with merge.method emr "
            "(an EMR output is read against the base's own files); use tokenizer.source base"
        )
    section(_check_combiner_inputs, merge, sparsify, models)
    if errors:
        if len(errors) == 1:
            raise ConfigError(errors[0])
        raise ConfigError(f"{len(errors)} config problems: " + "; ".join(errors))
    _warn_unused_weights(merge.method, models)
    return MergeConfig(
        base=base,
        models=models,
        sparsify=sparsify,
        merge=merge,
        exclude=exclude,
        output=output,
        runtime=runtime,
        inputs=inputs,
        emr=emr,
        seed=seed,
        tokenizer=tokenizer,
        slices=slices,
    )


def _passthrough_without_base(raw: dict) -> bool:
    merge = raw.get("merge")
    return isinstance(merge, dict) and merge.get("method") == PASSTHROUGH and "base" not in raw


def _parse_slices(
    raw: dict,
    models: tuple[ModelEntry, ...],
    merge: MergeMethod,
    sparsify: SparsifySpec,
    exclude: tuple[str, ...],
    output: OutputSpec,
) -> tuple[Slice, ...]:
    """`slices`, and what passthrough rules out (it copies: nothing to sparsify,
    exclude or cast)."""
    slices = parse_slices(raw.get("slices"), [m.name for m in models], merge.method)
    if merge.method == PASSTHROUGH:
        if sparsify.method != "none":
            raise ConfigError("sparsify.method: passthrough copies its tensors; use none")
        if exclude:
            raise ConfigError("exclude: passthrough copies every tensor of its slices")
        if output.dtype != "auto":
            raise ConfigError(
                f"output.dtype: passthrough copies the sources' bytes; {output.dtype} is "
                "not supported (leave it auto)"
            )
    return slices


# Hostile YAML. Aliases repeat a node without copying it, so a few hundred bytes of
# nested anchors ("billion laughs") stand for 10**9 values that any walk, message or
# dump of the config would expand. Aliases are allowed (anchors for shared settings
# are handy), but the document, with every alias counted as the nodes it repeats,
# must stay under MAX_CONFIG_NODES; recursive aliases are refused. Checked on the
# composed node graph, before any Python value is built.
MAX_CONFIG_BYTES = 4 * 2**20
MAX_CONFIG_NODES = 100_000


class _BoundedLoader(yaml.SafeLoader):
    def compose_document(self):  # type: ignore[override]
        node = super().compose_document()
        _check_nodes(node)
        return node


def _check_nodes(root: yaml.Node) -> None:
    """Expanded size of the node graph (each alias counted in full), without recursion;
    every string scalar must be encodable (no lone surrogates from \\u escapes)."""
    size: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            open_.discard(key)
            kids = _children(node)
            size[key] = min(MAX_CONFIG_NODES + 1, 1 + sum(size[id(c)] for c in kids))
            continue
        if key in size:
            continue
        if key in open_:
            line = node.start_mark.line + 1 if node.start_mark else "?"
            raise ConfigError(f"config: a YAML alias refers to itself (line {line})")
        if isinstance(node, yaml.ScalarNode):
            try:
                node.value.encode("utf-8")
            except UnicodeEncodeError:
                line = node.start_mark.line + 1 if node.start_mark else "?"
                raise ConfigError(
                    f"config: line {line}: the string {show(node.value)} is not valid "
                    "Unicode (a lone surrogate escape)"
                ) from None
            size[key] = 1
            continue
        open_.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node))
    if size[id(root)] > MAX_CONFIG_NODES:
        raise ConfigError(
            f"config: more than {MAX_CONFIG_NODES} values once YAML aliases are expanded "
            "(an alias bomb?); write the values out instead of nesting aliases"
        )


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def load_config(path: str | Path) -> MergeConfig:
    """A config file: native, or another tool's format detected from its keys and
    translated (frontends/: a mergekit config, whose relative paths are read from
    the working directory, as mergekit reads them)."""
    p = Path(path)
    raw = read_yaml(p)
    from .frontends import mergekit

    if mergekit.is_mergekit(raw):
        native, notes = mergekit.translate(raw, Path.cwd())
        for note in notes:
            log.warning("mergekit config: %s", note)
        try:
            return parse_config(native, Path.cwd())
        except ConfigError as e:
            raise ConfigError(f"{path} (a mergekit config; `tadmerge convert` shows it "
                              f"translated): {e}") from None  # fmt: skip
    return parse_config(raw, p.parent)


def read_yaml(path: str | Path) -> Any:
    """A config file's YAML (bounded: MAX_CONFIG_BYTES, MAX_CONFIG_NODES), not empty."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: config file not found")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: config file is over {MAX_CONFIG_BYTES // 2**20} MiB")
    try:
        raw = yaml.load(p.read_bytes(), Loader=_BoundedLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"{path}: not valid YAML{where}: {show(problem, 200)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: the YAML is nested too deeply") from None
    except ValueError as e:  # an integer literal of thousands of digits
        raise ConfigError(f"{path}: not a usable config: {show(str(e), 120)}") from None
    if raw is None:
        raise ConfigError(f"{path}: the config is empty")
    return raw


def with_overrides(cfg: MergeConfig, **kw: Any) -> MergeConfig:
    """Apply CLI overrides (None = not given) with the same validation as the file."""
    out, rt = cfg.output, cfg.runtime
    if kw.get("out") is not None:
        out = replace(out, path=str(Path(kw["out"]).resolve()))
    if kw.get("dtype") is not None:
        out = replace(out, dtype=_choice(kw["dtype"], "--dtype", OUTPUT_DTYPES))
    if kw.get("push_to_hub") is not None:
        from .io.hub_push import check_repo_id

        out = replace(out, push_to_hub=check_repo_id(kw["push_to_hub"], "--push-to-hub"))
    if kw.get("replace_weights"):
        out = replace(out, hub_replace_weights=True)
    if kw.get("shard_size") is not None:
        out = replace(out, shard_size=parse_size(kw["shard_size"], "--shard-size"))
    if kw.get("memory_budget") is not None:
        rt = replace(rt, memory_budget=parse_size(kw["memory_budget"], "--memory-budget"))
    if kw.get("device") is not None:
        rt = replace(rt, device=_choice(kw["device"], "--device", {"auto", "cpu", "cuda"}))
    if kw.get("executor") is not None:
        rt = replace(rt, executor=_choice(kw["executor"], "--executor", {"local", "ray"}))
    if kw.get("workers") is not None:
        rt = replace(rt, workers=_workers(kw["workers"], "--workers"))
    if kw.get("progress") is not None:
        rt = replace(rt, progress=kw["progress"])
    if kw.get("if_changed"):
        rt = replace(rt, if_changed=True)
    cfg = replace(cfg, output=out, runtime=rt)
    if kw.get("seed") is not None:
        cfg = replace(cfg, seed=_int(kw["seed"], "--seed", 0))
    if kw.get("allow_pickle"):
        cfg = replace(cfg, inputs=replace(cfg.inputs, allow_pickle=True))
    return cfg
