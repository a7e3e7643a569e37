"""Wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2, prune the lowest per output row, no weight update."""

from __future__ import annotations

from .. import ops
from .base import LinearResult, Method
from .stats import NormStats


class Wanda(Method):
    name = "wanda"
    stats = NormStats

    def prepare(self, stats, where):
        return stats.norm

    def prune_linear(self, weight, prepared, pattern, where):
        ops.wanda_prune(weight, prepared.to(weight.device), pattern.sparsity, pattern.n, pattern.m)
        return LinearResult(weight)
