"""Open every input (headers only) and check that they agree.

All problems of all inputs are gathered into one InputError: a nightly job's log
should list everything wrong with a published checkpoint at once.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace

from ..config import MergeConfig
from ..errors import ConfigError, InputError, InputProblem
from ..io import lora
from ..io.checkpoint import HEAD_NAME, Checkpoint, open_checkpoint, with_tied_head
from ..io.entries import NAMES_LIKE, EntryTable

log = logging.getLogger("tadmerge")

MERGE, COPY, EXCLUDE = "merge", "copy", "exclude"
PASS = "pass"  # one source tensor's bytes (passthrough: planners/slices.py)


def open_inputs(cfg: MergeConfig, *, fetch: bool = True) -> list[Checkpoint]:
    """Open base then models and check they agree; every problem in one InputError.

    A model that cannot be opened does not hide the disagreements of the others.
    Hub inputs are opened from their headers first (io/hub_inputs.py), so every
    disagreement is found before any weights are downloaded; with `fetch`, their
    weights are then downloaded at the planned commit and everything checked again
    on the downloaded files.
    """
    problems: list[InputProblem] = []
    out: list[Checkpoint | None] = []
    for source in [cfg.base] + [m.path for m in cfg.models]:
        first = next((ck.tensors for ck in out if ck is not None), None)
        like = NAMES_LIKE.set(first.names if isinstance(first, EntryTable) else None)
        try:
            out.append(open_checkpoint(source, allow_pickle=cfg.inputs.allow_pickle, fetch=False))
        except InputError as e:
            problems.extend(e.problems)
            out.append(None)
        finally:
            NAMES_LIKE.reset(like)
        _share_names(out)  # (at once: a million names are ~66 MB per list)
    pending = fetch and any(ck is not None and not ck.fetched for ck in out)
    checked = _checked(cfg, out, problems, warn=not pending)
    if not pending:
        return checked
    fetched: list[Checkpoint | None] = []
    for ck in out:
        try:
            fetched.append(fetch_input(ck, cfg.inputs.allow_pickle))  # type: ignore[arg-type]
        except InputError as e:
            problems.extend(e.problems)
            fetched.append(None)
    return _checked(cfg, fetched, problems, warn=True)


def fetch_input(ck: Checkpoint, allow_pickle: bool) -> Checkpoint:
    """`ck` with its weights downloaded (a header-only hub input), else `ck`."""
    if ck.fetched:
        return ck
    from ..io.checkpoint import _parse_repo_id
    from ..io.hub_inputs import fetch_weights

    repo = _parse_repo_id(ck.source)
    assert repo is not None  # (only hub ids are opened header-only)
    try:
        return fetch_weights(ck, repo[0], allow_pickle)
    except InputError:
        raise
    except Exception as exc:
        from ..io.checkpoint import _hub_problem

        raise InputError(_hub_problem(exc, ck.source, repo[0], ck.revision, False)) from None


def _checked(
    cfg: MergeConfig, out: list[Checkpoint | None], problems: list[InputProblem], warn: bool
) -> list[Checkpoint]:
    """The opened inputs read as fine-tunes of the base on its vocabulary, after
    every agreement check (InputError with `problems` and theirs)."""
    out = untie(out)
    _share_names(out)
    if out[0] is not None and out[0].adapter is not None:
        problems.append(
            InputProblem(out[0].root, None, "the base is a LoRA adapter: give its base model")
        )
        out[0] = None
    if out[0] is not None:
        out = [out[0]] + [_as_finetune(ck, out[0], problems) for ck in out[1:]]
        if cfg.tokenizer.source == "base":
            out = [out[0]] + [on_base_vocab(ck, out[0]) for ck in out[1:]]
            if warn:
                _warn_trimmed(cfg, out)
        elif all(ck is not None for ck in out):
            from .vocabulary import on_output_vocab  # (transformers: only here)

            out = on_output_vocab(cfg, out, problems)  # type: ignore[arg-type]
        problems.extend(agreement_problems(cfg, out))
    if problems:
        raise InputError(problems)
    return out  # type: ignore[return-value]


def _share_names(inputs: list[Checkpoint | None]) -> None:
    """Inputs whose tensor names are the base's hold the base's name list (one list
    for a million names, not one per input: io/entries.py)."""
    tables = [ck.tensors for ck in inputs if ck is not None]
    if tables and isinstance(tables[0], EntryTable):
        for t in tables[1:]:
            if isinstance(t, EntryTable):
                t.share_names(tables[0])


def on_base_vocab(ck: Checkpoint | None, base: Checkpoint) -> Checkpoint | None:
    """A fine-tune with added tokens read on the base's vocabulary: each vocabulary
    tensor (embeddings, head) with more rows than the base's, and otherwise its
    shape, is read as its first rows (the same bytes: rows lead), the rest dropped
    (Checkpoint.trimmed says which). Fewer rows than the base: left to
    agreement_problems (refused)."""
    if ck is None:
        return None
    trimmed = []
    tensors: dict | None = None  # (a copy only when a tensor is trimmed)
    for n in ck.tensors:
        if not _VOCAB_RE.search(n):  # (first: a name test, no entry made)
            continue
        e = ck.tensors[n]
        b = base.tensors.get(n)
        if (
            b is None
            or len(e.shape) < 1
            or len(e.shape) != len(b.shape)
            or e.shape[0] <= b.shape[0]
            or tuple(e.shape[1:]) != tuple(b.shape[1:])
        ):
            continue
        rows = b.shape[0]
        tensors = dict(ck.tensors.items()) if tensors is None else tensors
        tensors[n] = replace(e, shape=(rows, *e.shape[1:]), nbytes=rows * e.row_numel * e.itemsize)
        trimmed.append((n, e.shape[0], rows))
    if not trimmed:
        return ck
    return replace(ck, tensors=tensors, trimmed=tuple(trimmed))


def _warn_trimmed(cfg: MergeConfig, inputs: list[Checkpoint | None]) -> None:
    said = [
        f"'{m.name}' ({ck.trimmed[0][1] - ck.trimmed[0][2]} rows beyond the base's "
        f"{ck.trimmed[0][2]} in {', '.join(n for n, _, _ in ck.trimmed)})"
        for ck, m in zip(inputs[1:], cfg.models, strict=True)
        if ck is not None and ck.trimmed
    ]
    if said:
        log.warning(
            "added tokens: merged on the base's vocabulary, the rows beyond it dropped, "
            "in model(s) %s",
            "; ".join(said),
        )


def vocabulary_report(cfg: MergeConfig, inputs: list[Checkpoint]) -> dict | None:
    """merge_report.json's "vocabulary": the rows dropped (tokenizer: base), or the
    output's vocabulary (union | <model>: planners/vocabulary.Vocabulary); None
    when a base merge dropped nothing."""
    vocab = inputs[0].vocabulary
    if vocab is not None:
        return vocab.report()  # type: ignore[attr-defined]
    trims = vocab_trims(cfg, inputs)
    return {"source": "base", "dropped": trims} if trims else None


def vocab_trims(cfg: MergeConfig, inputs: list[Checkpoint]) -> dict[str, list[dict]]:
    """For the report: per model, its vocabulary tensors read on the base's rows."""
    return {
        m.name: [{"tensor": n, "rows": own, "rows_merged": rows} for n, own, rows in ck.trimmed]
        for ck, m in zip(inputs[1:], cfg.models, strict=True)
        if ck.trimmed
    }


def _as_finetune(ck: Checkpoint | None, base: Checkpoint, problems: list) -> Checkpoint | None:
    """A LoRA adapter read as a fine-tune of `base` (io/lora.py); others as they are."""
    if ck is None or ck.adapter is None:
        return ck
    adapter, weights = ck.adapter  # type: ignore[misc]
    try:
        return replace(ck, tensors=lora.resolve(adapter, weights, base.tensors))
    except InputError as e:
        problems.extend(e.problems)
        return None


def untie(inputs: list[Checkpoint | None]) -> list[Checkpoint | None]:
    """When some inputs store lm_head.weight and others, with tie_word_embeddings:
    true in their config.json, do not, those are read as tied: their head is their
    embedding (io/checkpoint.with_tied_head). All tied or all untied: unchanged."""
    if not any(ck is not None and HEAD_NAME in ck.tensors for ck in inputs):
        return inputs
    return [(ck and with_tied_head(ck)) or ck for ck in inputs]


def agreement_problems(cfg: MergeConfig, inputs: list[Checkpoint | None]) -> list[InputProblem]:
    """Missing or extra tensors, shape or dtype mismatches (models that opened).
    Float tensors of another float dtype than the base's are no mismatch (casts()).

    One problem per model and kind of disagreement, saying what to do, not one per
    tensor: a fine-tune saved in float32 of a bf16 base differs in every tensor, and
    a few names are enough to recognise it. Up to GROUP_AFTER missing or extra
    tensors are still listed one by one (a tied head missing is one tensor).
    """
    base = inputs[0]
    assert base is not None
    problems: list[InputProblem] = []
    if all(ck is None or _same_columns(base, ck) for ck in inputs[1:]):
        names: set[str] = set()  # (not needed: every input holds the base's name list)
    else:
        names = set(base.tensors)
    for ck, model in zip(inputs[1:], cfg.models, strict=True):
        if ck is None:
            continue
        where = _where(ck)
        if _same_columns(base, ck):  # one name list: nothing missing or extra
            problems.extend(_column_problems(model.name, where, ck, base))
            continue
        missing = sorted(names - set(ck.tensors))
        if len(missing) <= GROUP_AFTER:
            for n in missing:
                problems.append(
                    InputProblem(where, n, f"missing in model '{model.name}'" + _tie_hint(n))
                )
        else:
            problems.append(
                InputProblem(
                    where,
                    None,
                    f"{len(missing)} tensors of the base are missing in model '{model.name}', "
                    f"e.g. {_some(missing)}: is it a fine-tune of this base (or a partial "
                    "checkpoint, an adapter)?",
                )
            )
        extra = sorted(set(ck.tensors) - names)
        if len(extra) <= GROUP_AFTER:
            for n in extra:
                hint = (
                    " (is the base's head tied? set tie_word_embeddings: true in its config.json)"
                    if n == HEAD_NAME
                    else ""
                )
                problems.append(
                    InputProblem(ck.tensors[n].file, n, f"not in the base ({_where(base)}){hint}")
                )
        else:
            problems.append(
                InputProblem(
                    where,
                    None,
                    f"{len(extra)} tensors of model '{model.name}' are not in the base "
                    f"({_where(base)}), e.g. {_some(extra)}: is it a fine-tune of this base?",
                )
            )
        shapes: dict[tuple, list[str]] = {}
        dtypes: dict[tuple[str, str], list[str]] = {}
        for n in sorted(names & set(ck.tensors)):
            a, b = base.tensors[n], ck.tensors[n]
            if a.shape != b.shape:
                shapes.setdefault(_shape_key(a.shape, b.shape), []).append(n)
            if a.dtype != b.dtype and not (a.is_float and b.is_float):
                # float against float merges: τ = widen(model) − widen(base) (casts())
                dtypes.setdefault((b.dtype, a.dtype), []).append(n)
        problems.extend(_shape_dtype_problems(model.name, where, shapes, dtypes, ck, base))
    return problems


def _shape_dtype_problems(
    model: str, where: str, shapes: dict, dtypes: dict, ck: Checkpoint, base: Checkpoint
) -> list[InputProblem]:
    problems = [
        InputProblem(where, None, _shape_message(model, key, group, ck, base))
        for key, group in shapes.items()
    ]
    for (mine, theirs), group in dtypes.items():
        problems.append(
            InputProblem(
                where,
                None,
                f"{_count(group)} in dtype ({mine} in model '{model}' vs {theirs} in "
                f"the base), e.g. {_some(group)}: convert the model to {theirs} (the "
                f"base's dtype) before merging, or merge against a base saved in {mine}",
            )
        )
    return problems


def _same_columns(base: Checkpoint, ck: Checkpoint) -> bool:
    a, b = base.tensors, ck.tensors
    return isinstance(a, EntryTable) and isinstance(b, EntryTable) and a.names is b.names


def _column_problems(
    model: str, where: str, ck: Checkpoint, base: Checkpoint
) -> list[InputProblem]:
    """agreement_problems' shape and dtype checks for two EntryTables of one name
    list: rows are compared by shape and dtype code, and only the rows that differ
    go through the per-name messages."""
    a, b = base.tensors, ck.tensors
    assert isinstance(a, EntryTable) and isinstance(b, EntryTable)
    diff = [
        i
        for i in range(len(a))
        if a.dtype[i] != b.dtype[i] or a.shapes[a.shape_id[i]] != b.shapes[b.shape_id[i]]
    ]
    if not diff:
        return []
    shapes: dict[tuple, list[str]] = {}
    dtypes: dict[tuple[str, str], list[str]] = {}
    for i in diff:
        x, y = a.entry_at(i), b.entry_at(i)
        if x.shape != y.shape:
            shapes.setdefault(_shape_key(x.shape, y.shape), []).append(x.name)
        if x.dtype != y.dtype and not (x.is_float and y.is_float):
            dtypes.setdefault((y.dtype, x.dtype), []).append(x.name)
    return _shape_dtype_problems(model, where, shapes, dtypes, ck, base)


def casts(cfg: MergeConfig, inputs: list[Checkpoint]) -> dict[str, list[dict]]:
    """Per model, the float tensors in another dtype than the base's (widened to
    float32 with the base's and merged like any other): {model name: [{"from":
    model dtype, "to": the base's dtype, "tensors": count}]}; models with none left out.
    (The merged tensors are written in output.dtype, auto: the base's.)"""
    base = inputs[0]
    out: dict[str, list[dict]] = {}
    for ck, model in zip(inputs[1:], cfg.models, strict=True):
        columns = _column_casts(base.tensors, ck.tensors)
        counts: dict[tuple[str, str], int] = columns or {}
        for n, b in ck.tensors.items() if columns is None else ():
            a = base.tensors.get(n)
            if a is None or not (a.is_float and b.is_float):
                continue
            if isinstance(b, lora.LoraEntry):  # (made in float32: io/lora.py)
                continue
            # (io/vocab_rows.VocabEntry: made in float32 from the input's own dtype)
            mine, theirs = _stored(b), _stored(a)
            if mine != theirs:
                counts[(mine, theirs)] = counts.get((mine, theirs), 0) + 1
        if counts:
            out[model.name] = [
                {"from": f, "to": t, "tensors": c} for (f, t), c in sorted(counts.items())
            ]
    return out


def _column_casts(base, model) -> dict[tuple[str, str], int] | None:
    """casts' counts from the dtype columns of two EntryTables with one name list
    (no entry made per tensor); None when they are not."""
    if not (
        isinstance(base, EntryTable) and isinstance(model, EntryTable) and base.names is model.names
    ):
        return None
    import numpy as np

    from ..io.entries import _DTYPE_LIST
    from ..io.safetensors_format import FLOAT_DTYPES

    floats = np.array([d in FLOAT_DTYPES for d in _DTYPE_LIST])
    a = np.frombuffer(base.dtype, dtype=np.uint8)
    b = np.frombuffer(model.dtype, dtype=np.uint8)
    cast = (a != b) & floats[a] & floats[b]
    pairs, n = np.unique(np.stack([b[cast], a[cast]]), axis=1, return_counts=True)
    return {
        (_DTYPE_LIST[x], _DTYPE_LIST[y]): int(c)
        for (x, y), c in zip(pairs.T.tolist(), n.tolist(), strict=True)
    }


def _stored(e) -> str:
    """The dtype an input stores a tensor in (a VocabEntry is made in float32)."""
    return getattr(e, "stored_dtype", "") or e.dtype


def _tie_hint(name: str) -> str:
    if name != HEAD_NAME:
        return ""
    return (
        " (a tied head? set tie_word_embeddings: true in its config.json to read it as "
        "the embedding)"
    )


GROUP_AFTER = 3  # missing / extra tensors listed one by one up to this many per model


def _some(names: list[str], k: int = 3) -> str:
    shown = ", ".join(names[:k])
    return shown + (f" (+{len(names) - k} more)" if len(names) > k else "")


def _count(names: list[str]) -> str:
    return "1 tensor differs" if len(names) == 1 else f"{len(names)} tensors differ"


def _shape_key(base: tuple, model: tuple) -> tuple:
    """('rows', base rows, model rows) when only the first dimension differs, else
    ('shape',): a vocabulary of another size changes the rows of the embeddings and
    the head, and nothing else."""
    if base and model and len(base) == len(model) and tuple(base[1:]) == tuple(model[1:]):
        return ("rows", base[0], model[0])
    return ("shape",)


_VOCAB_RE = re.compile(r"(embed|lm_head|wte|word_emb|output\.weight$|\bhead\b)")


def _shape_message(
    name: str, key: tuple, group: list[str], ck: Checkpoint, base: Checkpoint
) -> str:
    if key[0] == "rows":
        _, rows_base, rows_model = key
        if all(_VOCAB_RE.search(n) for n in group):
            return (
                f"{_count(group)} in rows ({rows_model} in model '{name}' vs {rows_base} in "
                f"the base), e.g. {_some(group)}: a vocabulary of another size (added "
                f"tokens?); resize the model's embeddings to the base's {rows_base} rows, or "
                "merge against a base with the model's vocabulary"
            )
        return (
            f"{_count(group)} in rows ({rows_model} in model '{name}' vs {rows_base} in the "
            f"base), e.g. {_some(group)}: the model is not a fine-tune of this base"
        )
    e = group[0]
    return (
        f"{_count(group)} in shape (model '{name}' vs the base), e.g. {e} "
        f"{list(ck.tensors[e].shape)} vs {list(base.tensors[e].shape)}"
        + (f", {_some(group[1:], 2)}" if len(group) > 1 else "")
        + ": the model is not a fine-tune of this base (another architecture or size?)"
    )


def classify(cfg: MergeConfig, inputs: list[Checkpoint]) -> dict[str, tuple[str, str]]:
    """Decide per tensor: merge, copy (non-float) or exclude ({name: (kind, reason)})."""
    problems = agreement_problems(cfg, list(inputs))
    if problems:
        raise InputError(problems)
    base = inputs[0]
    patterns = [re.compile(p) for p in cfg.exclude]
    kinds: dict[str, tuple[str, str]] = {}
    merged = (MERGE, "")  # (one tuple for every merged tensor, not one each)
    # (sorted by name; an EntryTable is, and makes its entries in one pass)
    entries = (
        base.tensors if isinstance(base.tensors, EntryTable) else dict(sorted(base.tensors.items()))
    )
    for n, entry in entries.items():
        hit = next((p.pattern for p in patterns if p.search(n)), None)
        if hit is not None and hasattr(entry, "rows_of"):
            raise ConfigError(
                f"exclude pattern {hit!r} matches {n}, a vocabulary tensor, under "
                f"tokenizer.source {cfg.tokenizer.source}: its rows are the output's "
                "vocabulary, not the base's; merge it (remove the pattern) or use "
                "tokenizer.source base"
            )
        if hit is not None:
            kinds[n] = (EXCLUDE, f"matches exclude pattern {hit!r}")
        elif not entry.is_float:
            kinds[n] = (COPY, f"{entry.dtype} is not a floating dtype (copied, checked identical)")
        elif entry.numel == 0:
            kinds[n] = (COPY, "empty tensor")
        else:
            kinds[n] = merged
    return kinds


def _where(ck: Checkpoint) -> str:
    return ck.files[0] if len(ck.files) == 1 else ck.root
