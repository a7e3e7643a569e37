"""Reference mask selection. Every mask here is True where a weight is removed (pruned)."""

from __future__ import annotations

import torch


def prune_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights an unstructured selection at ``sparsity`` removes (nearest integer)."""
    return int(round(numel * sparsity))


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mark the ``n`` lowest scores of every ``m`` consecutive entries along the last dimension.

    scores: [rows, cols] with cols divisible by m. Returns a bool mask of the same shape.
    """
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    lowest = torch.topk(groups, n, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, lowest, True)
    return mask.reshape(rows, cols)


def row_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mark exactly the ``k`` lowest scores of every row (ties broken by position).

    A selection, not a sort: the k-th smallest value of each row is the threshold, everything below it is
    marked, and as many entries equal to it as are still missing.
    """
    rows, cols = scores.shape
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= cols:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = torch.kthvalue(scores, k, dim=1, keepdim=True).values
    below = scores < threshold
    ties = scores == threshold
    missing = k - below.sum(dim=1, keepdim=True)
    if torch.equal(ties.sum(dim=1, keepdim=True), missing):  # no row has more ties at its threshold than it needs
        return below | ties
    return below | (ties & (ties.cumsum(dim=1) <= missing))


def tensor_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mark exactly the ``k`` lowest scores of the whole tensor."""
    return row_mask(scores.reshape(1, -1), k).reshape(scores.shape)


def topk_mask(scores: torch.Tensor, sparsity: float, prune_n: int = 0, prune_m: int = 0,
              per_row: bool = True) -> torch.Tensor:
    """Mark everything but the highest scores: the ``prune_n`` lowest of every ``prune_m`` consecutive entries of a
    row (N:M), else the round(sparsity * cols) lowest of each row (``per_row``) or the round(sparsity * numel)
    lowest of the whole tensor. scores [rows, cols], non-negative; compared in fp32, ties broken by position."""
    scores = scores.float()
    if prune_n:
        return nm_mask(scores, prune_n, prune_m)
    if per_row:
        return row_mask(scores, prune_count(scores.shape[1], sparsity))
    return tensor_mask(scores, prune_count(scores.numel(), sparsity))
