"""Magnitude pruning: the baseline. No calibration data."""

from __future__ import annotations

from .base import ScoreMethod
from .registry import register


@register
class Magnitude(ScoreMethod):
    """Zero the smallest |W| of each layer (unstructured) or of every M inputs (N:M)."""

    name = "magnitude"
    per_row = False

    def score(self, weight, prepared):
        return weight.abs()
