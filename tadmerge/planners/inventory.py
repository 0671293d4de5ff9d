"""Open every input (headers only) and check that they agree.

All problems of all inputs are gathered into one InputError: a nightly job's log
should list everything wrong with a published checkpoint at once.
"""

from __future__ import annotations

import re

from ..config import MergeConfig
from ..errors import InputError, InputProblem
from ..io.checkpoint import Checkpoint, open_checkpoint

MERGE, COPY, EXCLUDE = "merge", "copy", "exclude"


def open_inputs(cfg: MergeConfig) -> list[Checkpoint]:
    """Open base then models and check they agree; every problem in one InputError.

    A model that cannot be opened does not hide the disagreements of the others.
    """
    problems: list[InputProblem] = []
    out: list[Checkpoint | None] = []
    for source in [cfg.base] + [m.path for m in cfg.models]:
        try:
            out.append(open_checkpoint(source, allow_pickle=cfg.inputs.allow_pickle))
        except InputError as e:
            problems.extend(e.problems)
            out.append(None)
    if out[0] is not None:
        problems.extend(agreement_problems(cfg, out))
    if problems:
        raise InputError(problems)
    return out  # type: ignore[return-value]


def agreement_problems(cfg: MergeConfig, inputs: list[Checkpoint | None]) -> list[InputProblem]:
    """Missing or extra tensors, shape or dtype mismatches (models that opened)."""
    base = inputs[0]
    assert base is not None
    problems: list[InputProblem] = []
    names = set(base.tensors)
    for ck, model in zip(inputs[1:], cfg.models, strict=True):
        if ck is None:
            continue
        where = _where(ck)
        for n in sorted(names - set(ck.tensors)):
            problems.append(InputProblem(where, n, f"missing in model '{model.name}'"))
        for n in sorted(set(ck.tensors) - names):
            problems.append(
                InputProblem(ck.tensors[n].file, n, f"not in the base ({_where(base)})")
            )
        for n in sorted(names & set(ck.tensors)):
            a, b = base.tensors[n], ck.tensors[n]
            if a.shape != b.shape:
                problems.append(
                    InputProblem(b.file, n, f"shape {list(b.shape)} != base {list(a.shape)}")
                )
            if a.dtype != b.dtype:
                problems.append(InputProblem(b.file, n, f"dtype {b.dtype} != base {a.dtype}"))
    return problems


def classify(cfg: MergeConfig, inputs: list[Checkpoint]) -> dict[str, tuple[str, str]]:
    """Decide per tensor: merge, copy (non-float) or exclude ({name: (kind, reason)})."""
    problems = agreement_problems(cfg, list(inputs))
    if problems:
        raise InputError(problems)
    base = inputs[0]
    names = set(base.tensors)
    patterns = [re.compile(p) for p in cfg.exclude]
    kinds: dict[str, tuple[str, str]] = {}
    for n in sorted(names):
        entry = base.tensors[n]
        hit = next((p.pattern for p in patterns if p.search(n)), None)
        if hit is not None:
            kinds[n] = (EXCLUDE, f"matches exclude pattern {hit!r}")
        elif not entry.is_float:
            kinds[n] = (COPY, f"{entry.dtype} is not a floating dtype (copied, checked identical)")
        elif entry.numel == 0:
            kinds[n] = (COPY, "empty tensor")
        else:
            kinds[n] = (MERGE, "")
    return kinds


def _where(ck: Checkpoint) -> str:
    return ck.files[0] if len(ck.files) == 1 else ck.root
