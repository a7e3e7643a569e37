"""What the driver runs on each linear: a method's mask (and its own update, if it has one), then optionally an
update of the kept weights on that mask (``--update obs|lsq``), then optionally a refinement (``--refine dsnot``)."""

from __future__ import annotations

from typing import Any

import torch

from ..patterns import SparsityPattern
from .base import LinearResult, Method, Step
from .stats import LayerStats, NormStats, part


class Recipe:
    """A method, an optional update and an optional refinement, seen by the driver as one method: one statistic
    per input group holding everything the steps need, one ``prepare`` and one ``prune_linear`` per linear."""

    def __init__(self, method: Method, update: Step | None = None, refine: Step | None = None,
                 allocation: Step | str | None = None, permute: bool = False):
        if update is not None:
            update.check_method(method)
        self.method, self.update, self.refine = method, update, refine
        # Model-level, run by sparsekern.allocate before the layers are pruned: a registered allocation step, the
        # path of a JSON map, or None (uniform).
        self.allocation = allocation
        self.steps = [step for step in (method, update, refine) if step is not None]
        self.name = method.name
        # Channel permutation for N:M: the group's Wanda scores choose it, so the norms are collected too.
        self.permute = permute
        self.needs = frozenset().union(*(step.needs for step in self.steps), {"norm"} if permute else ())
        self.stats = LayerStats if self.needs else None  # None: data-free (the driver skips calibration)
        # Calibration data is needed by the steps' statistics, or by an allocation's dense pass.
        self.needs_calibration = bool(self.needs) or bool(getattr(allocation, "needs", None))
        self.hessian_dtype = next((getattr(step.opts, "hessian_dtype") for step in self.steps
                                   if hasattr(step.opts, "hessian_dtype")), None)

    def new_stats(self, columns: int, device: torch.device, where: str) -> LayerStats:
        return LayerStats(columns, device, where, self.needs, self.hessian_dtype)

    def options(self) -> dict:
        """Every step's options (merged: a name two steps share has one value), and which steps ran."""
        merged: dict[str, Any] = {}
        for step in self.steps:
            merged.update(step.options())
        if isinstance(self.allocation, Step):
            merged.update(self.allocation.options())
        allocation = self.allocation.name if isinstance(self.allocation, Step) else self.allocation or "uniform"
        return {**merged, "update": self.update.name if self.update else "none",
                "refine": self.refine.name if self.refine else "none", "allocation": allocation,
                "permute": self.permute}

    def validate(self, pattern: SparsityPattern, where: str) -> None:
        for step in self.steps:
            step.validate(pattern, where)

    def group_permutation(self, stats: Any, weights: list[torch.Tensor], patterns: list[SparsityPattern],
                          where: str) -> torch.Tensor | None:
        """With ``permute``, for an input group pruned N:M (one N:M for all its linears): the input order that keeps
        the most Wanda score |W_ij| * ||X_j|| under the pattern (``sparsekern.permute``), with ``stats`` reordered to
        it; None otherwise. The linears are then pruned as W[:, perm] and put back in their own order."""
        if not self.permute or not patterns[0].is_nm or len({(p.n, p.m) for p in patterns}) != 1:
            return None
        from ..permute import nm_permutation

        norm = part(stats, NormStats).norm
        scores = torch.cat([w.detach().abs().float() * norm.to(w.device) for w in weights])  # on the layer's device
        perm = nm_permutation(scores, patterns[0].n, patterns[0].m).to(norm.device)
        if torch.equal(perm, torch.arange(perm.numel(), device=perm.device)):
            return None
        stats.permute(perm)
        return perm

    def prepare(self, stats: Any, where: str) -> list:
        # Last step first: a method's prepare may consume the statistics (SparseGPT turns the Hessian into its
        # inverse factor in place), so a later step that reads them as collected (--update lsq) goes before it.
        prepared = [step.prepare(stats, where) if step.needs else None for step in reversed(self.steps)]
        return prepared[::-1]

    def prune_linear(self, weight: torch.Tensor, prepared: list, pattern: SparsityPattern,
                     where: str) -> LinearResult:
        prepared = prepared if prepared is not None else [None] * len(self.steps)  # data-free: nothing prepared
        dense = weight.clone() if len(self.steps) > 1 else None  # the update and the refinement start from it
        result = self.method.prune_linear(weight, prepared[0], pattern, where)
        index = 1
        if self.update is not None:
            result = self.update.update(dense, result.pruned(), prepared[index], where, start=result.weight)
            index += 1
        if self.refine is not None:
            result = self.refine.refine(dense, result, prepared[index], pattern, where)
        return result
