"""What every pruning method provides to the sequential driver."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from ..patterns import SparsityPattern


@dataclasses.dataclass
class LinearResult:
    """The outcome of pruning one linear layer."""

    weight: torch.Tensor  # [out, in], the new weight (any float dtype; the driver casts it back)
    loss: Optional[float] = None  # the method's own reconstruction loss estimate, where it has one
    damp: Optional[float] = None  # the damping actually used (SparseGPT)


class Method:
    """A pruning method. ``stats`` names the calibration statistics it needs (None: data-free)."""

    name = "base"
    stats: Optional[type] = None

    def new_stats(self, columns: int, device: torch.device, where: str) -> Any:
        """A fresh statistic for one input group of ``columns`` features."""
        return self.stats(columns, device, where)

    def options(self) -> dict:
        """The method's options, for sparsity.json."""
        return {}

    def validate(self, pattern: SparsityPattern, where: str) -> None:
        """Raise before any work starts if this method cannot prune ``where`` with ``pattern``."""

    def prepare(self, stats: Any, where: str) -> Any:
        """Work shared by every linear that reads the same input (e.g. SparseGPT's inverse-Hessian factor)."""
        return stats

    def prune_linear(self, weight: torch.Tensor, prepared: Any, pattern: SparsityPattern, where: str) -> LinearResult:
        """Prune one [out, in] fp32 weight (a private copy the method may modify)."""
        raise NotImplementedError
