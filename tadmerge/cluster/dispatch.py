"""Where a merge's math runs, decided once by the driver.

The device (cpu | cuda) and the CPU kernels' backend are chosen here from the
config and the machine, recorded in merge_report.json, and handed to every
local worker and Ray actor as an argument (run_unit, unit_stats), which pass
them on to the engine (BlockContext.backend, the statistics' `backend`): no
worker reads the environment, decides for itself or keeps them in module
state. The backend is 'c' (the compiled kernels,
engine/native_kernels.c) where the library builds and loads, else 'torch'
(the reference: the torch functions of engine/ and methods/). Both give the
same output bytes (the kernels compute the same float32 operations in the same
order); the choice is recorded so that a report's figures can be traced to
the code that made them (its norms are float64 sums on both, added in other
orders: their last digits may differ).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass

from ..config import MergeConfig
from ..errors import ConfigError

log = logging.getLogger("tadmerge")

# The environment's override of runtime.kernels: auto | c | torch. Read when
# the driver decides (never at import), so a job's environment applies to it.
KERNELS_ENV = "TADMERGE_KERNELS"
BACKENDS = ("auto", "c", "torch")
# the backend numba's kernels were (removed): taken as auto, with a warning
DEPRECATED = "numba"


@dataclass(frozen=True)
class Dispatch:
    device: str  # cpu | cuda | auto (Ray: each actor's GPU decides, see ray_executor)
    kernels: str  # c | torch: what runs the CPU math
    c_kernels: str  # what the driver's machine says of the C kernels (for the report)

    def to_json(self) -> dict:
        return asdict(self)


def requested(cfg: MergeConfig) -> tuple[str, str]:
    """(backend asked for: auto | c | torch, where it was asked): runtime.kernels,
    or TADMERGE_KERNELS when that is auto. 'numba' (removed) is auto, said at
    WARNING."""
    name, where = cfg.runtime.kernels, "runtime.kernels"
    if name == "auto":
        name = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
        where = KERNELS_ENV
        if name not in (*BACKENDS, DEPRECATED):
            raise ConfigError(f"{KERNELS_ENV}: expected one of {', '.join(BACKENDS)}, not {name!r}")
    if name == DEPRECATED:
        log.warning(
            "%s: numba is deprecated (its kernels were removed): taken as auto, the C "
            "kernels where they build, else the torch reference",
            where,
        )
        name = "auto"
    return name, where


def decide(cfg: MergeConfig) -> Dispatch:
    """The dispatch of one merge: the kernels backend asked for (requested) and
    `runtime.device`, resolved on this machine (local executor). The C library
    is built or loaded here; where it cannot be, auto runs the torch reference
    (said once, at WARNING) and c is refused (ConfigError)."""
    from ..engine import native
    from .worker import resolve_device

    name, where = requested(cfg)
    device = cfg.runtime.device
    if device == "auto" and io_bound(cfg):
        device = "cpu"  # (without asking torch: these merges may never import it)
    if cfg.runtime.executor == "local":
        device = resolve_device(device)
    if name == "torch":
        return Dispatch(device, "torch", "not used")
    described = native.describe()
    if native.available():
        return Dispatch(device, "c", described)
    if name == "c":
        raise ConfigError(
            f"{where}: c, but the C kernels are {described}; "
            "auto runs the torch reference instead, with the same bytes"
        )
    if device != "cuda":
        log.warning(
            "C kernels %s: the torch reference runs instead, with the same bytes "
            "(slower; `tadmerge kernels` says more)",
            described,
        )
    return Dispatch(device, "torch", described)


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
