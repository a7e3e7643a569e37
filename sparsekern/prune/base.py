"""What every pruning step provides to the sequential driver."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from .. import ops
from ..patterns import SparsityPattern
from .registry import NoOptions, build_options


@dataclasses.dataclass
class LinearResult:
    """The outcome of pruning one linear layer."""

    weight: torch.Tensor  # [out, in], the new weight (any float dtype; the driver casts it back)
    loss: Optional[float] = None  # the method's own reconstruction loss estimate, where it has one
    damp: Optional[float] = None  # the damping actually used (SparseGPT)
    mask: Optional[torch.Tensor] = None  # True where pruned, when the step knows it (else: the zeros of weight)

    def pruned(self) -> torch.Tensor:
        return self.mask if self.mask is not None else self.weight == 0


class Step:
    """A registered pruning step (see ``registry``): its ``Options`` dataclass, and the calibration statistics it
    needs (``needs``: "hessian", "norm", "moments"; empty for data-free steps)."""

    name = "base"
    kind = "method"
    Options: type = NoOptions
    needs: frozenset = frozenset()

    def __init__(self, options: Any = None, **values):
        """``Step(options)`` with an ``Options`` instance, or ``Step(name=value, ...)``, each value checked."""
        self.opts = options if options is not None else build_options(type(self), values)

    def options(self) -> dict:
        """The step's options, for sparsity.json."""
        return dataclasses.asdict(self.opts)

    def validate(self, pattern: SparsityPattern, where: str) -> None:
        """Raise before any work starts if this step cannot handle ``where`` with ``pattern``."""

    def prepare(self, stats: Any, where: str) -> Any:
        """Work shared by every linear that reads the same input (e.g. SparseGPT's inverse-Hessian factor)."""
        return stats


class Method(Step):
    """Chooses a mask (and may update the kept weights itself: ``updates_weights``)."""

    kind = "method"
    updates_weights = False

    def prune_linear(self, weight: torch.Tensor, prepared: Any, pattern: SparsityPattern, where: str) -> LinearResult:
        """Prune one [out, in] fp32 weight (a private copy the method may modify)."""
        raise NotImplementedError


class Update(Step):
    """Reconstructs the kept weights on the mask a method chose (``--update``)."""

    kind = "update"

    def check_method(self, method: Method) -> None:
        """Raise if this update cannot follow ``method``. By default a method that updates the kept weights itself
        (SparseGPT, OBC) is refused: redoing its reconstruction from the dense weights would only repeat it."""
        if method.updates_weights:
            raise ValueError(f"--update {self.name}: method {method.name!r} already updates the kept weights "
                             "itself; drop --update, or pick a mask-only method (wanda, ria, magnitude)")

    def update(self, weight: torch.Tensor, mask: torch.Tensor, prepared: Any, where: str,
               start: torch.Tensor | None = None) -> LinearResult:
        """The kept weights reconstructed from the dense fp32 ``weight`` on ``mask`` (True where pruned);
        ``start``: the method's own pruned weights, which an iterative update may start from."""
        raise NotImplementedError


class ScoreMethod(Method):
    """A method that only scores weights: the ``sparsekern::topk_mask`` op keeps the highest scores of each row
    (``per_row``) or of the whole layer, or of every M inputs for N:M; the rest are zeroed, no update."""

    per_row = True

    def score(self, weight: torch.Tensor, prepared: Any) -> torch.Tensor:
        """Non-negative importance [out, in] of each weight."""
        raise NotImplementedError

    def prune_linear(self, weight, prepared, pattern, where):
        mask = ops.topk_mask(self.score(weight, prepared), pattern.sparsity, pattern.n, pattern.m, self.per_row)
        weight.masked_fill_(mask, 0)
        return LinearResult(weight, mask=mask)
