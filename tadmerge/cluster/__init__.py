"""Executors that run a plan: in-process (local) or on a Ray cluster."""
