"""SparseGPT's production layer loop: the blocked column sweep with lazy updates that drives the fused kernels.

For W [rows, cols] and U (U^T U = H^-1, upper), the columns go left to right in segments of ``width`` columns:
    at the start of every ``blocksize`` block (unstructured): the block's adaptive mask, the k smallest scores
        w^2 / U_jj^2 of the block as updated so far (k = round(sparsity * rows * block columns));
    N:M masks and quantization groups narrower than a segment: chosen by the segment sweep itself;
    quantization groups of a segment or wider: the min-max grid taken where the group starts;
    the segment sweep (OBS, column by column inside the segment), then the lazy update of every column right
    of it, W[:, i2:] -= Err @ U[i1:i2, i2:].
The math is ``sparsekern.reference.sparsegpt`` (the test oracle and the CPU fallback, which has its own plain
loop). The kernels plug in through three callbacks; :func:`sparsegpt_prune` is the kernel backends'
``sparsekern::sparsegpt_prune`` (``ops`` dispatches to it): this loop with the fused segment sweep, the radix select
and the lazy-update GEMM of ``sparsekern.triton_kernels``, imported when it first runs.
"""

from __future__ import annotations

import torch

from .. import reference
from ..reference.masks import prune_count
from ..reference.quant import minmax_params

SEGMENT_COLUMNS = 128  # the widest fused sweep segment: its [rows, width] tiles stay in registers


def segment_width(blocksize: int, prune_m: int, groupsize: int) -> int | None:
    """The widest sweep segment (<= SEGMENT_COLUMNS) that tiles the mask blocks, the N:M groups and the
    quantization groups; None if there is none."""
    for width in range(min(blocksize, SEGMENT_COLUMNS), 0, -1):
        if blocksize % width or (prune_m and width % prune_m):
            continue
        if groupsize and width % groupsize and groupsize % width:
            continue
        return width
    return None


def sparsegpt_prune(weight, hinv_upper, sparsity, prune_n=0, prune_m=0, blocksize=128, bits=0, groupsize=0,
                    lazy_precision="ieee"):
    """``reference.sparsegpt_prune`` (same arguments and results) on the fused kernels: segments of at most
    SEGMENT_COLUMNS columns swept in registers, the block masks by radix select, one GEMM per lazy update. A block
    structure no segment width tiles runs the reference."""
    width = segment_width(blocksize, prune_m, groupsize if bits else 0)
    if width is None:
        return reference.sparsegpt_prune(weight, hinv_upper, sparsity, prune_n, prune_m, blocksize, bits, groupsize,
                                         lazy_precision)
    from ..triton_kernels.select import lowest_k_mask
    from ..triton_kernels.sparsegpt_sweep import lazy_update, sweep_segment

    rows, cols = weight.shape
    w_all = torch.empty((rows, cols), dtype=torch.float32, device=weight.device)
    w_all.copy_(weight)
    err = torch.empty(rows, width, dtype=torch.float32, device=weight.device)
    mask = torch.empty(rows, width, dtype=torch.bool, device=weight.device)

    def sweep_into(segment, hinv_block, prune_mask, scale, zero, segment_groupsize, losses):
        columns = segment.shape[1]  # the last segment may be narrower
        sweep_segment(segment, hinv_block, prune_mask, prune_n, prune_m, bits, scale, zero, segment_groupsize,
                      segment, err[:, :columns], mask[:, :columns], losses, add_loss=True)
        return err[:, :columns]

    return blocked_prune(w_all, hinv_upper.to(torch.float32).contiguous(), sparsity, prune_n, blocksize, bits,
                         groupsize, width, lowest_k_mask, sweep_into,
                         lambda rest, err, hinv_rows: lazy_update(rest, err, hinv_rows, lazy_precision))


def blocked_prune(w_all, hinv, sparsity, prune_n, blocksize, bits, groupsize, width, select_mask, sweep_into,
                  lazy_update):
    """The layer loop of SparseGPT: segments of ``width`` columns (tiling blocks, N:M groups and quantization
    groups), the adaptive mask per ``blocksize`` block, the quantization grids, the lazy update after each segment.

    w_all [rows, cols] (a private copy, pruned in place) and hinv in the compute dtype. The implementation
    supplies: select_mask(scores, k), the exact k smallest of a block; sweep_into(segment, hinv_block,
    prune_mask, scale, zero, segment_groupsize, losses), which sweeps a segment in place (q into the segment view,
    its loss added to losses, group grids written into the scale/zero views) and returns its err [rows, width];
    lazy_update(rest, err, hinv_rows), rest -= err @ hinv_rows in place. Returns (w_all, losses, scales, zeros).
    """
    rows, cols = w_all.shape
    ngroups = 0 if not bits else (1 if not groupsize else -(-cols // groupsize))
    scales = torch.zeros(rows, ngroups, dtype=w_all.dtype, device=w_all.device)
    zeros = torch.zeros_like(scales)
    if bits and not groupsize:
        scales[:, 0], zeros[:, 0] = minmax_params(w_all, bits)
    losses = torch.zeros(rows, dtype=w_all.dtype, device=w_all.device)
    diag = torch.diagonal(hinv)
    block_mask = None
    for i1 in range(0, cols, width):
        i2 = min(i1 + width, cols)
        b1 = i1 - i1 % blocksize  # the mask block this sweep segment belongs to
        if not prune_n and i1 == b1:
            # Adaptive mask: chosen when a block starts, from weights with every earlier update applied.
            b2 = min(b1 + blocksize, cols)
            scores = w_all[:, b1:b2].square() / diag[b1:b2].square()
            block_mask = select_mask(scores, prune_count(scores.numel(), sparsity))
        prune_mask = None if prune_n else block_mask[:, i1 - b1 : i2 - b1]
        scale = zero = None
        segment_groupsize = 0
        if bits and not groupsize:
            scale, zero = scales, zeros
        elif bits and groupsize >= width:
            # The group starts at a segment start, where every column to its right is up to date; later
            # segments of the same group reuse its grid.
            g = i1 // groupsize
            if i1 % groupsize == 0:
                scales[:, g], zeros[:, g] = minmax_params(w_all[:, i1 : i1 + groupsize], bits)
            scale, zero = scales[:, g : g + 1], zeros[:, g : g + 1]
        elif bits:  # groups inside the segment: the sweep computes their grids into these views
            g0, g1 = i1 // groupsize, -(-i2 // groupsize)
            scale, zero = scales[:, g0:g1], zeros[:, g0:g1]
            segment_groupsize = groupsize
        err = sweep_into(w_all[:, i1:i2], hinv[i1:i2, i1:i2], prune_mask, scale, zero, segment_groupsize, losses)
        lazy_update(w_all[:, i2:], err, hinv[i1:i2, i2:])  # the lazy batch update
    return w_all, losses, scales, zeros
