"""EMR-Merging artifacts: unified delta, bit-packed task masks, rescalers.

from tadmerge.emr import task_state_dict, TaskSwitcher
sd = task_state_dict("out", "math")          # one task's full state dict
lazy = task_state_dict("out", "math", lazy=True)  # tensors built on access
sw = TaskSwitcher(model, "out"); sw.apply("math"); ...; sw.remove()
"""

from .artifacts import EmrOutput, LazyTaskTensors, TaskSwitcher, open_emr, task_state_dict
from .materialize import materialize
from .pin import BaseChangedError

__all__ = [
    "BaseChangedError",
    "EmrOutput",
    "LazyTaskTensors",
    "TaskSwitcher",
    "materialize",
    "open_emr",
    "task_state_dict",
]
