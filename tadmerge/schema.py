"""Value checks shared by the config and the method declarations.

Each raises ConfigError naming the key. A value is shown in a message by
`shown`, which clips it: a config can hold anything (a YAML alias can expand
to a huge list), and a message must stay one short line.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError

SHOWN_CHARS = 80


def shown(value: Any) -> str:
    """repr(value), clipped to SHOWN_CHARS characters (without building a huge repr
    of a long container first)."""
    if isinstance(value, list | tuple | dict | set) and len(value) > 8:
        return f"a {type(value).__name__} of {len(value)} items"
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1] + "…"


def check_number(
    value: Any,
    key: str,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}: expected a number, got {shown(value)}")
    v = float(value)
    if not math.isfinite(v):
        raise ConfigError(f"{key}: must be finite, got {shown(value)}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ConfigError(f"{key}: must be {'>' if lo_open else '>='} {lo}, got {shown(value)}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ConfigError(f"{key}: must be {'<' if hi_open else '<='} {hi}, got {shown(value)}")
    return v


def check_choice(value: Any, key: str, choices: set[str] | frozenset[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(
            f"{key}: expected one of {', '.join(sorted(choices))}; got {shown(value)}"
        )
    return value


def check_int(value: Any, key: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"{key}: expected an integer >= {lo}, got {shown(value)}")
    return value


def check_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {shown(value)}")
    return value
