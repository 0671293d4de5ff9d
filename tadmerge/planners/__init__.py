"""Planning: read headers only, validate every input, and lay out the work."""

from .plan import Plan, TensorPlan, Unit, make_plan

__all__ = ["Plan", "TensorPlan", "Unit", "make_plan"]
