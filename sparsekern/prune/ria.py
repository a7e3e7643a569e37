"""RIA, relative importance and activations (Zhang et al., ICLR 2024).

score_ij = (|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|) * ||X_j||_2 ** a: a weight matters relative to the
other weights of its output row and of its input channel, scaled by its input's activation norm (a = 0.5 by
default, the paper's choice). The lowest scores of each output row go, unstructured or N:M; no weight update."""

from __future__ import annotations

import dataclasses

from .base import ScoreMethod
from .registry import option, register
from .stats import NormStats, part


@dataclasses.dataclass
class RIAOptions:
    ria_alpha: float = option(0.5, "RIA: exponent a of the activation norm ||X_j||^a",
                              check=lambda a: None if 0 <= a <= 4 else "use an exponent between 0 and 4")


@register
class RIA(ScoreMethod):
    name = "ria"
    Options = RIAOptions
    needs = frozenset({"norm"})

    def prepare(self, stats, where):
        return part(stats, NormStats).norm

    def score(self, weight, prepared):
        magnitude = weight.abs()
        # An all-zero row or column has no relative importance to give; its sum is replaced by 1 (scores 0).
        row_sum = magnitude.sum(dim=1, keepdim=True)
        col_sum = magnitude.sum(dim=0, keepdim=True)
        relative = magnitude / row_sum.masked_fill(row_sum == 0, 1) + magnitude / col_sum.masked_fill(col_sum == 0, 1)
        return relative * prepared.to(weight.device).pow(self.opts.ria_alpha)
