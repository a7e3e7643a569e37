"""Calibration statistics, accumulated batch by batch from forward hooks without keeping the activations."""

from __future__ import annotations

import torch

from .. import ops


def _check_finite(x: torch.Tensor, where: str) -> None:
    if not torch.isfinite(x).all():
        raise FloatingPointError(
            f"{where}: calibration activations contain NaN or Inf (the layers before it overflowed); "
            "load the model in float32 or bfloat16 (--dtype), or check the calibration data"
        )


class _RunningStatistic:
    """Folds each batch of a linear's inputs into a running statistic; ``count`` is the number of rows seen."""

    def __init__(self, where: str):
        self.where = where
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        _check_finite(x, self.where)
        self._update(x)
        self.count += x.numel() // x.shape[-1]

    def _update(self, x: torch.Tensor) -> None:
        raise NotImplementedError


class HessianStats(_RunningStatistic):
    """H = 2/n * sum x x^T over the n input rows seen (SparseGPT), accumulated in fp32.

    input_dtype: cast the inputs to it first (e.g. torch.bfloat16: half-precision products on tensor cores);
    None keeps them as the model produced them.
    """

    def __init__(self, columns: int, device: torch.device, where: str, input_dtype: torch.dtype | None = None):
        super().__init__(where)
        self.hessian = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.input_dtype = input_dtype

    def _update(self, x: torch.Tensor) -> None:
        if self.input_dtype is not None:
            x = x.to(self.input_dtype)
        ops.hessian_update(self.hessian, x, self.count)


class NormStats(_RunningStatistic):
    """Per-input-channel mean of squares over the rows seen (Wanda); ``norm`` is its square root."""

    def __init__(self, columns: int, device: torch.device, where: str):
        super().__init__(where)
        self.sumsq = torch.zeros(columns, dtype=torch.float32, device=device)

    def _update(self, x: torch.Tensor) -> None:
        ops.sumsq_update(self.sumsq, x, self.count)

    @property
    def norm(self) -> torch.Tensor:
        return self.sumsq.sqrt()
