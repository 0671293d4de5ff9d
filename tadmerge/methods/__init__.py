"""Merge methods: one module per sparsifier and per combiner (see registry.py)."""

from .registry import (
    MAGNITUDE,
    NONE,
    RANDOM,
    Combiner,
    Param,
    Sparsifier,
    all_params,
    combiner,
    combiners,
    describe,
    family,
    parse_params,
    sparsifier,
    sparsifiers,
)

__all__ = [
    "MAGNITUDE",
    "NONE",
    "RANDOM",
    "Combiner",
    "Param",
    "Sparsifier",
    "all_params",
    "combiner",
    "combiners",
    "describe",
    "family",
    "parse_params",
    "sparsifier",
    "sparsifiers",
]
