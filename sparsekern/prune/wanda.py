"""Wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2, prune the lowest per output row, no weight update."""

from __future__ import annotations

from .base import ScoreMethod
from .registry import register
from .stats import NormStats, part


@register
class Wanda(ScoreMethod):
    name = "wanda"
    needs = frozenset({"norm"})

    def prepare(self, stats, where):
        return part(stats, NormStats).norm

    def score(self, weight, prepared):
        return weight.abs() * prepared.to(weight.device)
