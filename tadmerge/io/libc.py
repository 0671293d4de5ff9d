"""libc's functions that Python's os and mmap modules do not offer as needed.

Called through ctypes, which releases the GIL for the call: the point for
madvise (mmap.madvise holds it for a whole populate) as much as the function
itself for sync_file_range.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable


def function(name: str, argtypes: tuple, restype=ctypes.c_int) -> Callable | None:
    """libc's `name` with errno kept (ctypes.get_errno), or None where this
    libc has no such function (not Linux, or an old one)."""
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = argtypes, restype
    return fn
