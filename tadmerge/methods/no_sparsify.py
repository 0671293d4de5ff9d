"""No sparsifier: t = τ."""

from __future__ import annotations

from .registry import NONE, Sparsifier

METHOD = Sparsifier(name="none", summary="keep every entry (t = τ)", family=NONE)
