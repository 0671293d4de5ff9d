"""Where a merge's math runs, decided once by the driver.

The device (cpu | cuda) and the CPU kernels' backend (auto: the C kernels where
they build, numba's where installed; numba; torch) are chosen here from the
config and the machine, recorded in merge_report.json, and handed to every
local worker and Ray actor, which apply them as given: no worker reads the
environment or decides for itself. Any backend gives the same output bytes
(the torch functions of methods/ are the reference, and the kernels compute
the same float32 operations in the same order); the choice is recorded so that
a report's figures can be traced to the code that made them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass

from ..config import MergeConfig
from ..errors import ConfigError

log = logging.getLogger("tadmerge")

# The environment's override of runtime.kernels: auto | numba | torch. Read when
# the driver decides (never at import), so a job's environment applies to it.
KERNELS_ENV = "TADMERGE_KERNELS"
BACKENDS = ("auto", "numba", "torch")


@dataclass(frozen=True)
class Dispatch:
    device: str  # cpu | cuda | auto (Ray: each actor's GPU decides, see ray_executor)
    kernels: str  # auto | numba | torch
    c_kernels: str  # what the driver's machine says of the C kernels (for the report)

    def to_json(self) -> dict:
        return asdict(self)


def decide(cfg: MergeConfig) -> Dispatch:
    """The dispatch of one merge: `runtime.kernels` (or TADMERGE_KERNELS when it is
    auto) and `runtime.device` resolved on this machine (local executor)."""
    from ..engine import native
    from .worker import resolve_device

    kernels = cfg.runtime.kernels
    if kernels == "auto":
        kernels = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
        if kernels not in BACKENDS:
            raise ConfigError(f"{KERNELS_ENV}: expected one of {', '.join(BACKENDS)}")
    device = cfg.runtime.device
    if device == "auto" and io_bound(cfg):
        device = "cpu"  # (without asking torch: these merges may never import it)
    if cfg.runtime.executor == "local":
        device = resolve_device(device)
    return Dispatch(device, kernels, native.describe() if kernels == "auto" else "not used")


def io_bound(cfg: MergeConfig) -> bool:
    """Merges that cost about one read of the inputs on a CPU (task arithmetic,
    averaging and linear, with no sparsifier or a magnitude selection, on the
    compiled CPU kernels): a GPU adds a copy of every block to and from it and
    saves nothing, so `device: auto` keeps them on the CPU."""
    from .. import methods

    family = methods.sparsifier(cfg.sparsify.method).family
    return cfg.merge.method in ("task_arithmetic", "average", "linear") and family in (
        methods.NONE,
        methods.MAGNITUDE,
    )


def apply(dispatch: Dispatch) -> None:
    """Set this process's kernels backend as the driver decided (each worker process
    calls it once, before its first unit)."""
    from ..engine import kernels

    kernels.set_backend(dispatch.kernels)
