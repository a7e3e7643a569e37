"""Exact k-smallest selection over a whole tensor, by radix select on the fp32 bit patterns (no sort).

Used for the masks chosen over a whole population at once: SparseGPT's adaptive mask (the k smallest scores
of a [rows, blocksize] block) and unstructured magnitude pruning (the k smallest |W| of a layer).

Non-negative fp32 values order like their int32 bit patterns, so the k-th smallest value is found digit by
digit, most significant first, from histograms: bits 30..20 (2048 bins), 19..10 and 9..0 (1024 bins each).
Each pass is one launch over the whole tensor in which every program histograms its chunk (``tl.histogram``)
and adds it to a global histogram, then one single-program launch picks the bin holding rank k and narrows
the prefix. After three passes the prefix is the k-th smallest value T exactly. The mask is then every value
below T plus the first (k - count below T) values equal to T in row-major order: the tie-break of
``reference.tensor_mask``, so the masks are identical. Everything stays on the device: no host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsekern.reference.masks import prune_count

from ._outputs import new_output

# (shift, digits) of the three radix passes over the 31 magnitude bits.
_PASSES = ((20, 11), (10, 10), (0, 10))
_BLOCK = 4096  # elements per program: large enough that the per-program histogram flush is amortized


@triton.jit
def _radix_histogram_kernel(values_ptr, numel, state_ptr, hist_ptr,
                            SHIFT: tl.constexpr, DIGITS: tl.constexpr, FIRST: tl.constexpr, BLOCK: tl.constexpr):
    """hist[d] += #{v in this chunk : (bits(v) >> SHIFT) & (2^DIGITS - 1) == d, higher bits == state[0]}."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    # Clearing the sign bit maps -0.0 to +0.0; the values are documented to be >= 0.
    bits = tl.load(values_ptr + offs, mask=inside, other=0.0).to(tl.int32, bitcast=True) & 0x7FFFFFFF
    keep = inside
    if not FIRST:
        keep = keep & ((bits >> (SHIFT + DIGITS)) == tl.load(state_ptr))
    digit = (bits >> SHIFT) & ((1 << DIGITS) - 1)
    hist = tl.histogram(digit, 1 << DIGITS, mask=keep)
    tl.atomic_add(hist_ptr + tl.arange(0, 1 << DIGITS), hist, mask=hist > 0)


@triton.jit
def _radix_pick_kernel(hist_ptr, state_ptr, k, DIGITS: tl.constexpr, FIRST: tl.constexpr):
    """state = (prefix, rank): append the digit of the bin holding the rank-th value; make rank relative to it.

    Clears the histogram for the next pass."""
    bins = tl.arange(0, 1 << DIGITS)
    hist = tl.load(hist_ptr + bins)
    if FIRST:
        prefix = 0
        rank = k
    else:
        prefix = tl.load(state_ptr)
        rank = tl.load(state_ptr + 1)
    below_rank = tl.cumsum(hist, 0) < rank  # bins holding only values ranked before `rank`
    digit = tl.sum(below_rank.to(tl.int32), 0)
    tl.store(state_ptr, (prefix << DIGITS) | digit)
    tl.store(state_ptr + 1, rank - tl.sum(tl.where(below_rank, hist, 0), 0))
    tl.store(hist_ptr + bins, tl.zeros_like(hist))


@triton.jit
def _count_ties_kernel(values_ptr, numel, state_ptr, ties_ptr, BLOCK: tl.constexpr):
    """ties[program] = how many values of this chunk equal the threshold T = state[0]."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    bits = tl.load(values_ptr + offs, mask=inside, other=0.0).to(tl.int32, bitcast=True) & 0x7FFFFFFF
    tl.store(ties_ptr + tl.program_id(0), tl.sum((inside & (bits == tl.load(state_ptr))).to(tl.int32), 0))


@triton.jit
def _select_mask_kernel(values_ptr, numel, state_ptr, ties_before_ptr, mask_ptr, BLOCK: tl.constexpr):
    """mask = v < T, or v == T among the first state[1] such values in row-major order."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    bits = tl.load(values_ptr + offs, mask=inside, other=0.0).to(tl.int32, bitcast=True) & 0x7FFFFFFF
    threshold = tl.load(state_ptr)
    ties = inside & (bits == threshold)
    tie_rank = tl.load(ties_before_ptr + tl.program_id(0)) + tl.cumsum(ties.to(tl.int32), 0)  # 1-based
    selected = (bits < threshold) | (ties & (tie_rank <= tl.load(state_ptr + 1)))
    tl.store(mask_ptr + offs, selected.to(tl.uint8), mask=inside)


def lowest_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (values' shape) marking exactly the k smallest values, ties broken by row-major position.

    values: any shape, non-negative and not NaN (scores such as w^2/d^2 or |w|); read as fp32.
    """
    flat = values.detach().float().contiguous().reshape(-1)
    numel = flat.numel()
    mask = new_output(values.shape, torch.bool, values.device)
    if k <= 0 or k >= numel:
        mask.fill_(k > 0)
        return mask
    programs = triton.cdiv(numel, _BLOCK)
    hist = torch.zeros(1 << _PASSES[0][1], dtype=torch.int32, device=flat.device)
    state = torch.empty(2, dtype=torch.int32, device=flat.device)  # (prefix so far, rank within it)
    for index, (shift, digits) in enumerate(_PASSES):
        first = index == 0
        _radix_histogram_kernel[(programs,)](flat, numel, state, hist, SHIFT=shift, DIGITS=digits, FIRST=first,
                                             BLOCK=_BLOCK)
        _radix_pick_kernel[(1,)](hist, state, k, DIGITS=digits, FIRST=first)
    ties = torch.empty(programs, dtype=torch.int32, device=flat.device)
    _count_ties_kernel[(programs,)](flat, numel, state, ties, BLOCK=_BLOCK)
    ties_before = torch.cumsum(ties, 0, dtype=torch.int32) - ties
    _select_mask_kernel[(programs,)](flat, numel, state, ties_before, mask.view(torch.uint8), BLOCK=_BLOCK)
    return mask


def magnitude_prune(weight: torch.Tensor, sparsity: float, prune_n: int = 0, prune_m: int = 0) -> torch.Tensor:
    """Zero the smallest |W| of the whole layer (unstructured) or of every prune_m inputs (N:M), in place.

    N:M is Wanda's N:M selection with unit activation norms (|W_ij| * 1 is |W_ij| exactly)."""
    if prune_n:
        from .wanda import wanda_prune

        ones = torch.ones(weight.shape[1], dtype=torch.float32, device=weight.device)
        return wanda_prune(weight, ones, 0.0, prune_n, prune_m)
    mask = lowest_k_mask(weight.abs(), prune_count(weight.numel(), sparsity))
    weight.masked_fill_(mask, 0)
    return mask


def topk_mask(scores: torch.Tensor, sparsity: float, prune_n: int = 0, prune_m: int = 0,
              per_row: bool = True) -> torch.Tensor:
    """Mark everything but the highest non-negative scores: N:M groups, each row, or the whole tensor.

    Each case is a selection kernel already here: Wanda's N:M and per-row kernels with unit activation norms
    (|s| * 1 is s exactly for s >= 0; the per-row kernel zeroes what it selects, so it gets a copy), or the radix
    select over the whole tensor."""
    from .wanda import nm_mask, wanda_prune

    if prune_n:
        return nm_mask(scores, prune_n, prune_m)
    if per_row:
        ones = torch.ones(scores.shape[1], dtype=torch.float32, device=scores.device)
        return wanda_prune(scores.clone(), ones, sparsity, 0, 0)
    return lowest_k_mask(scores, prune_count(scores.numel(), sparsity))
