"""Magnitude pruning: the baseline. No calibration data."""

from __future__ import annotations

from .. import ops
from .base import LinearResult, Method


class Magnitude(Method):
    """Zero the smallest |W| of each layer (unstructured) or of every M inputs (N:M)."""

    name = "magnitude"

    def prune_linear(self, weight, prepared, pattern, where):
        ops.magnitude_prune(weight, pattern.sparsity, pattern.n, pattern.m)
        return LinearResult(weight)
