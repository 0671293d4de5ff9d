"""Config front ends: other tools' config formats translated into tadmerge's native
config (config.py parse_config). Each is detected from its keys."""

from __future__ import annotations

from typing import Any

from . import mergekit


def detect(raw: Any) -> str:
    """'mergekit' or 'native', from the keys of a loaded config."""
    return "mergekit" if mergekit.is_mergekit(raw) else "native"
