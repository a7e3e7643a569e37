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


def part(stats, kind: type):
    """The statistic of class ``kind``: ``stats`` itself, or the one a :class:`LayerStats` holds."""
    return stats if isinstance(stats, kind) else stats.parts[kind]


class LayerStats:
    """Every statistic the chosen steps need for one input group, fed the same batches (``parts``: class -> stat).

    needs: names from {"hessian", "norm", "moments"}; hessian_dtype: "float32"/"float16"/"bfloat16" or None, the
    input dtype of :class:`HessianStats`."""

    def __init__(self, columns: int, device: torch.device, where: str, needs, hessian_dtype=None):
        kinds = {"hessian": HessianStats, "norm": NormStats, "moments": MomentStats}  # classes defined below
        self.parts = {}
        hessian_dtype = getattr(torch, hessian_dtype) if hessian_dtype else None
        for need in sorted(needs):
            kind = kinds[need]
            self.parts[kind] = (kind(columns, device, where, hessian_dtype) if kind is HessianStats
                                else kind(columns, device, where))

    def add(self, x: torch.Tensor) -> None:
        for stat in self.parts.values():
            stat.add(x)

    def permute(self, perm: torch.Tensor) -> None:
        """Reorder every statistic's inputs to ``perm`` (input j becomes input perm[j]), as the weights will be."""
        for stat in self.parts.values():
            for key, value in vars(stat).items():
                if isinstance(value, torch.Tensor):
                    value = value.index_select(0, perm.to(value.device))
                    if key == "hessian":
                        value = value.index_select(1, perm.to(value.device))
                    setattr(stat, key, value.contiguous())


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


class MomentStats(_RunningStatistic):
    """Per-input-channel first and second moments over the rows seen (DSnoT), accumulated in fp32.

    ``mean`` [cols] is the running mean E[x_j]; ``sumsq`` [cols] the running mean of squares E[x_j^2] (the same
    statistic as :class:`NormStats`, so ``norm`` is Wanda's scale). Both are count-weighted running averages:
    after a batch of m rows, s <- (count * s + sum over the batch) / (count + m). ``var`` = E[x^2] - E[x]^2 is
    the population variance; it loses relative precision where |mean| >> std (fp32 cancellation), which only
    blurs DSnoT's growing priority, never the pattern or the error bookkeeping.
    """

    def __init__(self, columns: int, device: torch.device, where: str):
        super().__init__(where)
        self.mean = torch.zeros(columns, dtype=torch.float32, device=device)
        self.sumsq = torch.zeros(columns, dtype=torch.float32, device=device)

    def _update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        rows = x.shape[0]
        if rows == 0:
            return
        total = self.count + rows
        # Sum in fp32 without materializing an fp32 copy of a half-precision batch.
        self.mean.mul_(self.count / total).add_(torch.sum(x, dim=0, dtype=torch.float32), alpha=1.0 / total)
        ops.sumsq_update(self.sumsq, x, self.count)

    @property
    def norm(self) -> torch.Tensor:
        return self.sumsq.sqrt()

    @property
    def var(self) -> torch.Tensor:
        return (self.sumsq - self.mean.square()).clamp_min(0.0)
