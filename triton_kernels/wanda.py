"""Wanda pruning and N:M masks: ``wanda_prune`` and ``nm_mask`` (references in ``sparsekern.reference``).

Two kernels, one launch per call:

- ``_wanda_prune_kernel``: unstructured Wanda, one program per row, the row held in registers. The k lowest
  scores of a row are found by a bitwise selection on the scores' bit patterns, not by a sort.
- ``_nm_mask_kernel``: the N lowest of every M consecutive scores, one program per tile of rows x groups. It
  scores and prunes a weight in place (``HAS_WEIGHT``, Wanda N:M) or only selects on given scores (``nm_mask``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsekern.reference.masks import prune_count

from . import _outputs


@triton.jit
def _wanda_scores(w, a):
    """|W_ij| * act_norm_j in fp32, one rounding: bit-identical to the reference's
    ``weight.abs().float() * act_norm.float()`` (abs is exact in any dtype), so ties and order agree."""
    return tl.abs(w.to(tl.float32)) * a.to(tl.float32)


@triton.jit
def _wanda_prune_kernel(
    w_ptr, a_ptr, mask_ptr, cols, k, stride_wr, stride_wc, stride_a, BLOCK: tl.constexpr,
):
    """Prune the k lowest scores S_j = |W_j| * a_j of one row of W in place; mask[row, j] = pruned.

    Scores are non-negative fp32 (act_norm is a norm, >= 0), so their int32 bit patterns B_j order exactly as
    the scores do. The k-th smallest pattern T is built bit by bit, from bit 30 down (bit 31, the sign, is 0):
    a bit stays set when fewer than k patterns are below the candidate, which keeps #{B < T} < k <= #{B <= T}. Then

        pruned_j = B_j < T  or  (B_j == T  and  #{i <= j : B_i == T} <= k - #{B < T})

    which is ``reference.masks.row_mask`` exactly: everything below the threshold, then the first ties by
    position. k = 0 gives T = 0 and prunes nothing; k = cols prunes all.
    """
    row = tl.program_id(0).to(tl.int64)  # row * stride overflows int32 on large layers
    offs = tl.arange(0, BLOCK)
    valid = offs < cols
    w_ptrs = w_ptr + row * stride_wr + offs * stride_wc
    w = tl.load(w_ptrs, mask=valid, other=0.0)
    a = tl.load(a_ptr + offs * stride_a, mask=valid, other=0.0)
    bits = _wanda_scores(w, a).to(tl.int32, bitcast=True)
    # Padding gets the largest pattern, which no candidate (<= 0x7FFFFFFF) is above: it is never counted.
    bits = tl.where(valid, bits, 0x7FFFFFFF)

    threshold = 0
    for i in tl.static_range(31):  # unrolled: bits 30, 29, ..., 0
        candidate = threshold | (1 << (30 - i))
        below = tl.sum((bits < candidate).to(tl.int32), axis=0)
        threshold = tl.where(below < k, candidate, threshold)

    below = bits < threshold
    ties = (bits == threshold) & valid
    missing = k - tl.sum(below.to(tl.int32), axis=0)
    pruned = below | (ties & (tl.cumsum(ties.to(tl.int32), axis=0) <= missing))
    tl.store(mask_ptr + row * cols + offs, pruned, mask=valid)
    tl.store(w_ptrs, tl.zeros_like(w), mask=pruned & valid)


@triton.jit
def _nm_mask_kernel(
    x_ptr, a_ptr, mask_ptr, rows, cols, prune_n, stride_xr, stride_xc, stride_a,
    M: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """mask[r, g*M + j] = rank_j < N within each group of M consecutive scores s_0..s_{M-1} of a row, where

        rank_j = #{i : s_i < s_j  or  (s_i == s_j  and  i < j)}

    (ties go to the earlier position; the reference's ``topk`` leaves their order unspecified). With
    ``HAS_WEIGHT``, x is the weight, s = |x| * act_norm (Wanda) and pruned entries of x are zeroed in place;
    otherwise x holds the scores (any float dtype, compared in fp32).

    The tile is [BLOCK_R rows, BLOCK_G groups, BLOCK_M members] (BLOCK_M = M rounded up to a power of two;
    extra members are masked off). M is small (4, 8), so the M^2 comparisons per group are cheaper than a sort.
    """
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    j = tl.arange(0, BLOCK_M)
    r3 = r.to(tl.int64)[:, None, None]
    col = g[None, :, None] * M + j[None, None, :]
    valid = (r3 < rows) & (g[None, :, None] < cols // M) & (j[None, None, :] < M)

    x_ptrs = x_ptr + r3 * stride_xr + col * stride_xc
    x = tl.load(x_ptrs, mask=valid, other=0.0)
    if HAS_WEIGHT:
        s = _wanda_scores(x, tl.load(a_ptr + col * stride_a, mask=valid, other=0.0))
    else:
        s = x.to(tl.float32)

    member = j[None, None, :]
    rank = tl.zeros([BLOCK_R, BLOCK_G, BLOCK_M], dtype=tl.int32)
    for i in tl.static_range(M):
        # Member i of every group, taken from the tile in registers (a max over one hot: exact, no re-read).
        s_i = tl.max(tl.where(member == i, s, float("-inf")), axis=2)[:, :, None]
        rank += ((s_i < s) | ((s_i == s) & (i < member))).to(tl.int32)
    pruned = rank < prune_n

    tl.store(mask_ptr + r3 * cols + col, pruned, mask=valid)
    if HAS_WEIGHT:
        tl.store(x_ptrs, tl.zeros_like(x), mask=pruned & valid)


# At most this many elements per N:M program: 4 warps x 16 per thread, enough work to hide load latency.
_NM_TILE = 2048


def _launch_nm(x, act_norm, mask, prune_n, prune_m, has_weight):
    rows, cols = x.shape
    block_m = triton.next_power_of_2(prune_m)
    # Groups along the row first (contiguous memory), then as many rows as fill the tile.
    block_g = max(1, min(triton.next_power_of_2(cols // prune_m), 512 // block_m))
    block_r = max(1, min(triton.next_power_of_2(rows), _NM_TILE // (block_g * block_m)))
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols // prune_m, block_g))
    a = act_norm if has_weight else x  # unused without a weight, but the kernel needs a pointer
    _nm_mask_kernel[grid](
        x, a, mask, rows, cols, prune_n, x.stride(0), x.stride(1), a.stride(0) if has_weight else 0,
        M=prune_m, HAS_WEIGHT=has_weight, BLOCK_R=block_r, BLOCK_G=block_g, BLOCK_M=block_m, num_warps=4,
    )


def wanda_prune(
    weight: torch.Tensor, act_norm: torch.Tensor, sparsity: float, prune_n: int = 0, prune_m: int = 0
) -> torch.Tensor:
    """Zero the lowest |W_ij| * act_norm_j of each row (unstructured) or of every prune_m inputs (N:M) in place;
    return the bool mask (True = pruned). weight [rows, cols] fp32/fp16/bf16, any strides; act_norm [cols]."""
    rows, cols = weight.shape
    mask = _outputs.new_output((rows, cols), torch.bool, weight.device)
    if mask.numel() == 0:
        return mask
    if prune_n:
        _launch_nm(weight, act_norm, mask, prune_n, prune_m, has_weight=True)
        return mask
    block = triton.next_power_of_2(cols)
    # The whole row lives in registers and every bit of the search is a block-wide sum over it, so the block
    # holds the row: at most 32 elements per thread (ptxas for sm_90, contiguous fp16 rows: 32768 columns on
    # 32 warps use 64 registers with a 104-byte spill; 16384 on 16 warps, 97 registers, no spill; strided rows
    # keep 64-bit pointers and spill more). That covers LLaMA-70B's down_proj (28672 inputs). Shorter rows take
    # fewer warps (at least 4) so that several rows share an SM; rows over 32768 columns still run, with more
    # elements per thread (spills).
    num_warps = min(32, max(4, block // (32 * 32)))
    _wanda_prune_kernel[(rows,)](
        weight, act_norm, mask, cols, prune_count(cols, sparsity), weight.stride(0), weight.stride(1),
        act_norm.stride(0), BLOCK=block, num_warps=num_warps,
    )
    return mask


def nm_mask(scores: torch.Tensor, prune_n: int, prune_m: int) -> torch.Tensor:
    """Bool mask [rows, cols] marking the prune_n lowest of every prune_m consecutive scores of each row."""
    mask = _outputs.new_output(scores.shape, torch.bool, scores.device)
    if mask.numel() == 0:
        return mask
    _launch_nm(scores, None, mask, prune_n, prune_m, has_weight=False)
    return mask
