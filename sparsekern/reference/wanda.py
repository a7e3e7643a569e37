"""Reference Wanda (Sun et al., 2023) and magnitude pruning: score, select, zero. No weight update."""

from __future__ import annotations

import torch

from .masks import nm_mask, prune_count, row_mask, tensor_mask


def wanda_prune(
    weight: torch.Tensor, act_norm: torch.Tensor, sparsity: float, prune_n: int = 0, prune_m: int = 0
) -> torch.Tensor:
    """Zero the lowest |W_ij| * ||X_j||_2 of each output row, in place; return the mask (True = pruned).

    weight: [rows, cols]; act_norm: [cols], the L2 norm (any common scale) of each input channel over the
    calibration tokens. Unstructured: the round(sparsity * cols) lowest per row. N:M: the prune_n lowest of every
    prune_m consecutive inputs.
    """
    scores = weight.abs().float() * act_norm.float().unsqueeze(0)
    if prune_n:
        mask = nm_mask(scores, prune_n, prune_m)
    else:
        mask = row_mask(scores, prune_count(weight.shape[1], sparsity))
    weight.masked_fill_(mask, 0)
    return mask


def magnitude_prune(weight: torch.Tensor, sparsity: float, prune_n: int = 0, prune_m: int = 0) -> torch.Tensor:
    """Zero the smallest |W| of the whole layer (unstructured) or of every m inputs (N:M), in place."""
    scores = weight.abs().float()
    if prune_n:
        mask = nm_mask(scores, prune_n, prune_m)
    else:
        mask = tensor_mask(scores, prune_count(weight.numel(), sparsity))
    weight.masked_fill_(mask, 0)
    return mask
