"""OBC (Optimal Brain Compression, Frantar et al. 2022): exact greedy OBS pruning, one weight at a time per row.

Each output row w of a linear is pruned on its own against the layer's inverse Hessian H^-1: every step removes
the remaining weight q with the smallest OBS error w_q^2 / [H^-1]_qq, moves the row's other weights by
dw = -(w_q / [H^-1]_qq) H^-1[q, :] (which zeroes w_q), and eliminates q from H^-1 (the inverse of H without input
q). SparseGPT approximates this with one fixed column order shared by all rows; OBC is the exact greedy solver it
is measured against, at a cost of O(rows * k * n^2) for k pruned weights of n per row: a quality ceiling for
small models and layers, not a way to prune large ones.

H^-1 is kept as an upper Cholesky factor per row, which ``ops.cholesky_delete`` shrinks by one input per step.
Rows run in chunks that delete one index each per step, so every tensor stays rectangular.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import torch
from tqdm.auto import tqdm

from .. import ops
from ..reference.masks import prune_count
from .base import LinearResult
from .registry import option, register
from .sparsegpt import HessianMethod, HessianOptions, Prepared

# Layers whose rows * k * n^2 exceeds this get the cost warning (once per run) and a progress bar: about a
# second's work for the reference ops on two CPU cores.
EXPENSIVE = 1e9
# Bytes of one chunk's per-row factors. Each step's cholesky_delete allocates a new factor: on the GPU the caching
# allocator reuses it, so chunks are large; on the CPU an allocation past glibc's mmap threshold (at most 32 MiB)
# is fresh pages every step, and the page faults cost more than the rotations (64 rows x 576 inputs at 50%, 2 CPU
# cores: 19.6 s as one 85 MiB chunk, 8.6 s in chunks of 12 rows, 16 MiB). Without sparsekern._C the reference
# op's Python loop runs once per chunk, so there few large chunks win (the same layer: 86 s vs 140 s).
FACTOR_BYTES = {"cuda": 1 << 30, "cpu": 16 << 20, "reference": 1 << 30}


@dataclasses.dataclass
class OBCOptions(HessianOptions):
    rows_per_batch: Optional[int] = option(None, "OBC: rows eliminated together (default: as memory allows)",
                                           check=lambda r: None if r > 0 else "must be positive")


@register
class OBC(HessianMethod):
    name = "obc"
    Options = OBCOptions

    def __init__(self, options=None, progress: bool = True, **values):
        super().__init__(options, **values)
        self.progress = progress  # its own bars on large layers
        self._warned = False

    def prune_linear(self, weight, prepared: Prepared, pattern, where):
        rows, n = weight.shape
        weight[:, prepared.dead] = 0  # inputs never seen: their weights are free to remove (score 0)
        # N zeros in each of the n/M groups, or the same unstructured count in every row.
        k = n // pattern.m * pattern.n if pattern.is_nm else prune_count(n, pattern.sparsity)
        upper = prepared.hinv_upper.to(weight.device)
        dtype = torch.promote_types(weight.dtype, upper.dtype)  # fp64 in, fp64 throughout (the tests' oracle)
        weight, upper = weight.to(dtype), upper.to(dtype)
        if k == 0:
            return LinearResult(weight, loss=0.0, damp=prepared.damp)

        expensive = rows * k * n * n > EXPENSIVE
        if expensive and not self._warned:
            self._warned = True
            warnings.warn(
                f"{where}: OBC costs O(rows * k * n^2) per linear (here {rows} x {k} x {n}^2); it is meant for "
                "small models and layers, and as a quality ceiling for SparseGPT (--method sparsegpt)",
                stacklevel=2,
            )
        budget = FACTOR_BYTES["cuda" if weight.device.type == "cuda" else "cpu" if ops.NATIVE else "reference"]
        chunk = self.opts.rows_per_batch or max(1, budget // (n * n * upper.element_size()))
        loss = 0.0
        with tqdm(total=k * -(-rows // chunk), desc=f"obc {where}", unit="step", leave=False,
                  disable=not (self.progress and expensive)) as bar:
            for start in range(0, rows, chunk):
                block = weight[start:start + chunk]
                weight[start:start + chunk], block_loss = _prune_rows(block, upper, k, pattern, bar)
                loss += block_loss
        return LinearResult(weight, loss=loss, damp=prepared.damp)


def _prune_rows(w: torch.Tensor, upper: torch.Tensor, k: int, pattern, bar) -> tuple[torch.Tensor, float]:
    """Greedy OBS on rows w [B, n] that share the inverse-Hessian factor ``upper``; returns (pruned rows, loss).

    w, the current diagonal of H^-1 and the map to original columns are compacted as inputs are removed, so
    position j of row b is original input index[b, j].
    """
    rows, n = w.shape
    w = w.clone()
    factor = upper.expand(rows, n, n).contiguous()  # each row eliminates different inputs from its own copy
    diag = upper.square().sum(0).expand(rows, n).contiguous()  # [H^-1]_jj: column sums of squares of U
    index = torch.arange(n, device=w.device).expand(rows, n)
    if pattern.is_nm:
        zeros_in_group = torch.zeros(rows, n // pattern.m, dtype=torch.long, device=w.device)
    entries = torch.arange(rows, device=w.device)
    loss = torch.zeros((), dtype=w.dtype, device=w.device)
    tiny = torch.finfo(w.dtype).tiny
    for _ in range(k):
        score = w.square() / diag
        if pattern.is_nm:  # only inputs of groups that still need zeros
            full = zeros_in_group.gather(1, index // pattern.m) >= pattern.n
            score = score.masked_fill(full, float("inf"))
        q = score.argmin(1)
        factor, dropped = ops.cholesky_delete(factor, q)
        # dropped * dropped[q] is row q of H^-1, so the OBS update -(w_q / [H^-1]_qq) H^-1[q, :] is this:
        pivot = dropped[entries, q]
        w_q = w[entries, q]
        w -= (w_q / pivot)[:, None] * dropped
        loss += (w_q / pivot).square().sum() / 2  # the OBS error w_q^2 / [H^-1]_qq, halved as SparseGPT reports
        # Eliminating q lowers the rest of the diagonal by dropped^2; the clamp keeps rounding from making a
        # diagonal entry non-positive (its score would then win for the wrong reason).
        diag = (diag - dropped.square()).clamp_min(tiny)
        if pattern.is_nm:
            zeros_in_group[entries, index[entries, q] // pattern.m] += 1
        keep = torch.arange(w.shape[1], device=w.device) != q[:, None]
        w, diag, index = (t[keep].view(rows, -1) for t in (w, diag, index))
        bar.update()
    # The kept weights go back to their original columns; the pruned ones are exactly zero.
    return torch.zeros(rows, n, dtype=w.dtype, device=w.device).scatter_(1, index, w), float(loss)
