"""Layer stacking: which source tensors make each output tensor (headers only).

A config with `slices` (tadmerge/slices.py) names its output tensors here:

- layer tensors (`<prefix><i>.<rest>`, e.g. `model.layers.7.mlp.up_proj.weight`)
  are numbered in the order of the slices: the output's layer n is the n-th
  layer taken, `start + offset` of each source of its slice;
- the tensors outside the layers come, as in mergekit, from the first slice
  (before the layers: the input embeddings, positions) or from the last one
  (after them: the final norm, the head).

With passthrough each output tensor has one source, copied byte for byte (kind
PASS: the worker copies `sources[0]`, split into row blocks within the memory
budget like any unit). With an element-wise combiner the sources are the base's
and each model's tensor at the slice's offsets (kind MERGE, classified like any
merge), so the engine, the statistics and the resume log treat it like any
tensor: the output is a function of (output name, its sources' bytes).

`layer_map` says, per output layer, which input and layer it came from: the
output's config.json is written from it (io/model_files.stacked_config).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import MergeConfig
from ..errors import ConfigError, InputError, InputProblem
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.safetensors_format import TensorEntry
from ..slices import BASE, PASSTHROUGH
from .inventory import COPY, EXCLUDE, MERGE, PASS, untie

# `<prefix><index>.<rest>`: the first `layers.`/`layer.`/`h.`/`blocks.`/`block.` segment
# followed by a number (Llama, Mistral, Qwen, Gemma: model.layers.N; GPT-2: transformer.h.N)
LAYER_RE = re.compile(
    r"^(?P<prefix>(?:[\w.]*?\.)?(?:layers|layer|h|blocks|block)\.)(?P<index>\d+)\.(?P<rest>.+)$"
)
# tensors outside the layers that come before them (taken from the first slice)
PRE_RE = re.compile(r"(embed|wte|wpe|word_emb|position_emb)")


@dataclass(frozen=True)
class Stack:
    """One input's tensors split into its layers and the rest."""

    prefix: str | None
    layers: dict[int, dict[str, TensorEntry]]  # layer -> rest of the name -> entry
    other: dict[str, TensorEntry]

    @property
    def count(self) -> int:
        return max(self.layers) + 1 if self.layers else 0


def stack_of(ck: Checkpoint, where: str) -> Stack:
    """`ck`'s tensors by layer; a ConfigError when its layers sit under several
    prefixes (an encoder and a decoder, a vision tower): slices stack one."""
    prefixes: set[str] = set()
    layers: dict[int, dict[str, TensorEntry]] = {}
    other: dict[str, TensorEntry] = {}
    for name, entry in ck.tensors.items():
        m = LAYER_RE.match(name)
        if m is None:
            other[name] = entry
            continue
        prefixes.add(m["prefix"])
        layers.setdefault(int(m["index"]), {})[m["rest"]] = entry
    if len(prefixes) > 1:
        raise ConfigError(
            f"slices: {where} has layers under several prefixes ({', '.join(sorted(prefixes))}); "
            "slices stack the layers of one (a model with one layer stack)"
        )
    return Stack(next(iter(prefixes), None), layers, other)


def open_slice_inputs(cfg: MergeConfig) -> list[Checkpoint]:
    """Base then models, opened (headers only) for passthrough: no agreement is
    asked of them beyond what the slices take (layouts checks that); every
    problem in one InputError. A LoRA adapter is refused (it has no layers of
    its own to copy)."""
    problems: list[InputProblem] = []
    out: list[Checkpoint | None] = []
    for source in [cfg.base] + [m.path for m in cfg.models]:
        try:
            ck = open_checkpoint(source, allow_pickle=cfg.inputs.allow_pickle)
        except InputError as e:
            problems.extend(e.problems)
            out.append(None)
            continue
        if ck.adapter is not None:
            problems.append(
                InputProblem(ck.root, None, "a LoRA adapter cannot be a passthrough source")
            )
            ck = None
        out.append(ck)
    if problems:
        raise InputError(problems)
    return untie(out)  # type: ignore[return-value]


@dataclass(frozen=True)
class Layout:
    """Output tensor name -> (kind, reason, sources); per output layer, (input index,
    source layer); the layer prefix of the output."""

    tensors: dict[str, tuple[str, str, tuple[TensorEntry, ...]]]
    layer_map: tuple[tuple[int, int], ...]
    prefix: str | None


def layout(cfg: MergeConfig, inputs: list[Checkpoint]) -> Layout:
    index = {BASE: 0, **{m.name: i + 1 for i, m in enumerate(cfg.models)}}
    label = {0: "the base", **{i + 1: f"model '{m.name}'" for i, m in enumerate(cfg.models)}}
    stacks = [stack_of(ck, label[i]) for i, ck in enumerate(inputs)]
    passthrough = cfg.merge.method == PASSTHROUGH
    problems: list[InputProblem] = []
    tensors: dict[str, tuple[str, str, tuple[TensorEntry, ...]]] = {}
    layer_map: list[tuple[int, int]] = []

    # which input gives each slice's source; the output's prefix is the first's
    order = [[index[s.model] for s in sl.sources] for sl in cfg.slices]
    if not passthrough:  # base first, then the models in config order
        order = [[0, *range(1, len(inputs))] for _ in cfg.slices]
    starts = [
        {index[s.model]: s.start for s in sl.sources} for sl in cfg.slices
    ]  # input -> first source layer
    prefix = stacks[order[0][0]].prefix
    for i, sl in enumerate(cfg.slices):
        for j, s in enumerate(sl.sources):
            st = stacks[index[s.model]]
            where = f"slices[{i}].sources[{j}]"
            if st.prefix is None:
                raise ConfigError(f"{where}.model: {label[index[s.model]]} has no layers")
            if st.prefix != prefix:
                raise ConfigError(
                    f"{where}.model: {label[index[s.model]]}'s layers are {st.prefix}N, "
                    f"the output's {prefix}N (one architecture)"
                )
            if s.end > st.count:
                raise ConfigError(
                    f"{where}.layer_range: [{s.start}, {s.end}] is past the "
                    f"{st.count} layers of {label[index[s.model]]}"
                )
    for i, sl in enumerate(cfg.slices):
        for offset in range(sl.layers):
            n = len(layer_map)
            srcs = [(k, starts[i][k] + offset) for k in order[i]]
            first, layer = srcs[0]
            layer_map.append((first, layer))
            for rest in sorted(stacks[first].layers.get(layer, {})):
                entries = []
                for k, lay in srcs:
                    e = stacks[k].layers.get(lay, {}).get(rest)
                    if e is None:
                        problems.append(
                            InputProblem(inputs[k].root, f"{prefix}{lay}.{rest}", "missing")
                        )
                    entries.append(e)
                tensors[f"{prefix}{n}.{rest}"] = (
                    "",
                    f"{label[first]} layer {layer}" if passthrough else "",
                    tuple(entries),  # type: ignore[arg-type]
                )
    # outside the layers: the first slice's (before) and the last slice's (after)
    first_in, last_in = order[0], order[-1]
    for which, ins, before in (("first", first_in, True), ("last", last_in, False)):
        for name in stacks[ins[0]].other:
            if bool(PRE_RE.search(name)) == before:
                why = _side(passthrough, label[ins[0]], which)
                tensors[name] = ("", why, _at(name, inputs, ins, problems))
    if problems:
        raise InputError(problems)
    patterns = [re.compile(p) for p in cfg.exclude]
    out = {}
    for name in sorted(tensors):
        _, reason, srcs = tensors[name]
        if passthrough:
            out[name] = (PASS, reason, srcs)
            continue
        _check_agree(name, srcs, inputs, problems)
        out[name] = (*_kind(name, srcs[0], patterns), srcs)
    if problems:
        raise InputError(problems)
    return Layout(out, tuple(layer_map), prefix)


def _side(passthrough: bool, label: str, which: str) -> str:
    return f"{label} (the {which} slice's)" if passthrough else ""


def _at(name: str, inputs: list[Checkpoint], order: list[int], problems: list) -> tuple:
    out = []
    for k in order:
        e = inputs[k].tensors.get(name)
        if e is None:
            problems.append(InputProblem(inputs[k].root, name, "missing"))
        out.append(e)
    return tuple(out)


def _check_agree(name: str, srcs: tuple, inputs: list[Checkpoint], problems: list) -> None:
    """The sources of a merged output tensor agree in shape (and in dtype where not
    both floats), like the inputs of any merge (inventory.agreement_problems)."""
    a = srcs[0]
    for e in srcs[1:]:
        if e.shape != a.shape:
            why = f"shape {list(e.shape)} vs {list(a.shape)}"
        elif e.dtype != a.dtype and not (e.is_float and a.is_float):
            why = f"dtype {e.dtype} vs {a.dtype}"
        else:
            continue
        problems.append(
            InputProblem(e.file, e.name, f"{why} in {a.name} of {a.file} (merged into {name})")
        )


def _kind(name: str, entry: TensorEntry, patterns: list[re.Pattern]) -> tuple[str, str]:
    """As inventory.classify: exclude patterns, non-float and empty tensors copied."""
    hit = next((p.pattern for p in patterns if p.search(name)), None)
    if hit is not None:
        return EXCLUDE, f"matches exclude pattern {hit!r}"
    if not entry.is_float:
        return COPY, f"{entry.dtype} is not a floating dtype (copied, checked identical)"
    if entry.numel == 0:
        return COPY, "empty tensor"
    return MERGE, ""
