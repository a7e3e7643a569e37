"""``--update obs``: SparseGPT's OBS reconstruction on a mask another method chose (e.g. Wanda or RIA + OBS).

The mask is fixed; the sweep goes through the columns in blocks with the upper Cholesky factor U of the damped
H^-1: each pruned weight's error err = w_j / U_jj is spread over the columns after it in the block (the fused
``sparsegpt_sweep`` op, with the block's mask given), and each block's errors reach the columns to its right in
one lazy GEMM, W[:, right] -= err @ U[block, right]. Kept weights move to compensate; pruned ones end at zero.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import ops
from ..reference.sparsegpt import round_to_tf32
from .base import LinearResult, Update
from .registry import register
from .sparsegpt import HessianOptions, SweepOptions, inverse_hessian_factor

# The sweep kernels hold at most this many columns of a block in registers.
_SWEEP_WIDTH = 128


def obs_update(weight: torch.Tensor, hinv_upper: torch.Tensor, mask: torch.Tensor, blocksize: int = 128,
               lazy_precision: str = "ieee") -> tuple[torch.Tensor, torch.Tensor]:
    """(updated fp32 weight with exact zeros where ``mask``, loss [rows]) for weight [rows, cols] and U [cols, cols].

    loss is SparseGPT's: the sum over pruned weights of err^2 / 2 at the moment each was removed."""
    w = weight.to(torch.float32, copy=True)
    hinv = hinv_upper.to(w.device, torch.float32)
    mask = mask.to(w.device)
    rows, cols = w.shape
    width = min(blocksize, _SWEEP_WIDTH)
    tf32 = lazy_precision == "tf32"
    losses = torch.zeros(rows, dtype=torch.float32, device=w.device)
    for i1 in range(0, cols, width):
        i2 = min(i1 + width, cols)
        q, err, loss, _ = ops.sparsegpt_sweep(w[:, i1:i2].contiguous(), hinv[i1:i2, i1:i2].contiguous(),
                                              mask[:, i1:i2].contiguous(), 0, 0, 0, None, None, 0)
        w[:, i1:i2] = q
        losses += loss
        if i2 < cols:
            if tf32:
                w[:, i2:] -= round_to_tf32(err) @ round_to_tf32(hinv[i1:i2, i2:])
            else:
                w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return w, losses


@dataclasses.dataclass
class ObsOptions(HessianOptions, SweepOptions):
    pass


@register
class ObsUpdate(Update):
    name = "obs"
    Options = ObsOptions
    needs = frozenset({"hessian"})

    def prepare(self, stats, where):
        return inverse_hessian_factor(stats, self.opts, where)

    def update(self, weight: torch.Tensor, mask: torch.Tensor, prepared, where: str, start=None) -> LinearResult:
        # Inputs never seen have a unit diagonal and no coupling in the damped H: their weights stay as the mask left
        # them, and nothing moves into them.
        updated, loss = obs_update(weight, prepared.hinv_upper, mask, self.opts.blocksize, self.opts.lazy_precision)
        return LinearResult(updated, loss=float(loss.sum()), damp=prepared.damp, mask=mask)
