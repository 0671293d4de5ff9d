"""Speed and memory benchmarks of tadmerge (see docs/benchmarks.md).

The scripts run as ``python benchmarks/NAME.py`` or ``python -m benchmarks.NAME``
from the repository root.
"""
