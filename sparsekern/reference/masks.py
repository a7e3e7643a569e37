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
    """Mark the ``k`` lowest scores of every row."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
    return mask


def tensor_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mark the ``k`` lowest scores of the whole tensor (a selection, not a full sort)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.topk(scores.flatten(), k, largest=False).indices] = True
    return mask.reshape(scores.shape)
