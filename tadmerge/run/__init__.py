"""A merge run's lifecycle around the units that cluster/ executes: driver.py runs
one merge start to end; its other modules hold the run's state on disk, its input
checks, its stages and its output files, one job each (docs/architecture.md)."""
