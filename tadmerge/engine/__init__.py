"""The merge math: torch tensors in, torch tensors out. No I/O, no Ray.

Everything here is exact and independent of how a tensor is split into blocks:
selection works on float bit patterns through mergeable histograms, and sums of
squares / absolute values are accumulated as integers (see exact.py).
"""
