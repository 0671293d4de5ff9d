"""Value checks shared by the config and the method declarations.

Each raises ConfigError naming the key. Values shown in messages are clipped
(`show`): a config value can be a huge string or, through YAML aliases, a huge
nested list, and a message must stay one short line.
"""

from __future__ import annotations

import math
import reprlib
from typing import Any

from .errors import ConfigError

MAX_SHOWN = 80
MAX_INT = 2**63  # integers in a config fit in 64 bits (seeds, sizes, counts)
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxtuple = 2, 4, 4, 4
_REPR.maxstring = _REPR.maxother = MAX_SHOWN


def show(value: Any, limit: int = MAX_SHOWN) -> str:
    """A short repr of a config value for messages, never longer than `limit` chars."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**limit:
        return f"<an integer of {value.bit_length()} bits>"
    try:
        text = _REPR.repr(value)
    except Exception:  # a value whose repr fails (a huge int deep inside, ...)
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_number(
    value: Any,
    key: str,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}: expected a number, got {show(value)}")
    try:
        v = float(value)
    except OverflowError:  # an integer beyond any float
        raise ConfigError(f"{key}: must be finite, got {show(value)}") from None
    if not math.isfinite(v):
        raise ConfigError(f"{key}: must be finite, got {show(value)}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ConfigError(f"{key}: must be {'>' if lo_open else '>='} {lo}, got {show(value)}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ConfigError(f"{key}: must be {'<' if hi_open else '<='} {hi}, got {show(value)}")
    return v


def check_choice(value: Any, key: str, choices: set[str] | frozenset[str]) -> str:
    # (a list or mapping is not hashable: test the type before the membership)
    if not isinstance(value, str) or value not in choices:
        allowed = ", ".join(sorted(choices))
        raise ConfigError(f"{key}: expected one of {allowed}; got {show(value)}")
    return value


def check_int(value: Any, key: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value < MAX_INT:
        raise ConfigError(f"{key}: expected an integer >= {lo} (below 2**63), got {show(value)}")
    return value


def check_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {show(value)}")
    return value
