"""Reference SparseGPT (Frantar & Alistarh, 2023): blocked OBS column sweep with lazy batch updates.

Given W [rows, cols] and U, the upper Cholesky factor of the damped inverse Hessian (U^T U = H^-1), columns
are visited left to right in blocks of ``blocksize``. For column i with d = U[i, i]:
    q        = the kept part of w = W[:, i] (0 where pruned), rounded to the grid when quantizing
    err      = (w - q) / d
    loss    += (w - q)^2 / d^2 / 2
    W[:, i:] -= err * U[i, i:]                 inside the segment, column by column
    W[:, i2:] -= Err @ U[i1:i2, i2:]           right of the segment, once per segment (the lazy batch update)
The segments are SWEEP_WIDTH columns (or whole blocks where that does not tile the patterns); since the lazy
update is exact, the result is that of the published per-block sweep. Masks: unstructured, the
k = round(sparsity * rows * B) smallest scores w^2 / d^2 of each block, chosen when the block starts (adaptive
mask selection); N:M, the n smallest scores of every m columns, chosen when the sweep reaches the group.
Quantization: asymmetric min-max grid per row (per ``groupsize`` columns when set), applied to kept weights
inside the sweep so their rounding error is compensated too; pruned weights stay exactly 0.

This is the test oracle and the CPU fallback (the ``torch`` backend of ``sparsekern::sparsegpt_prune``), written
as its own plain loop. The production loop that drives the fused kernels is
``sparsekern.prune.sparsegpt_loop.blocked_prune``; tests compare the two.
"""

from __future__ import annotations

import torch

from .masks import nm_mask, prune_count, tensor_mask
from .quant import minmax_params, quantize


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32, or fp64 when the caller works in fp64 (the exactness tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sparsegpt_sweep(
    block: torch.Tensor,
    hinv_block: torch.Tensor,
    prune_mask: torch.Tensor | None,
    prune_n: int = 0,
    prune_m: int = 0,
    bits: int = 0,
    scale: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
    groupsize: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sweep one block of columns.

    block: [rows, B] weights of the block, lazy updates already applied (not modified).
    hinv_block: [B, B] the block's diagonal tile of U.
    prune_mask: [rows, B] bool, the block's unstructured mask (True = prune); None when prune_n > 0 (N:M masks
        are chosen here every prune_m columns).
    bits: 0 = no quantization. scale, zero: [rows, G] grids. groupsize = 0: one given grid (G = 1) for the
        whole block. Otherwise G = ceil(B / groupsize) and group g's grid is computed here from the updated
        weights when the sweep reaches column g * groupsize, and written into scale/zero in place.
    Returns (q, err, loss, mask): the final block [rows, B], the scaled errors [rows, B] for the lazy update,
    the per-row loss [rows], and the mask used [rows, B].
    """
    w_block = block.clone()
    q_block = torch.empty_like(w_block)
    err_block = torch.empty_like(w_block)
    diag = torch.diagonal(hinv_block)
    mask = torch.zeros_like(w_block, dtype=torch.bool) if prune_mask is None else prune_mask.clone()
    per_group = bits > 0 and groupsize > 0
    for i in range(w_block.shape[1]):
        if prune_n and i % prune_m == 0:
            scores = w_block[:, i : i + prune_m] ** 2 / diag[i : i + prune_m] ** 2
            mask[:, i : i + prune_m] = nm_mask(scores, prune_n, prune_m)
        w = w_block[:, i]
        q = w.masked_fill(mask[:, i], 0)
        if bits:
            g = i // groupsize if per_group else 0
            if per_group and i % groupsize == 0:
                scale[:, g], zero[:, g] = minmax_params(w_block[:, i : i + groupsize], bits)
            q = quantize(q, scale[:, g], zero[:, g], bits).masked_fill_(mask[:, i], 0)
        q_block[:, i] = q
        err = (w - q) / diag[i]
        err_block[:, i] = err
        w_block[:, i:].addr_(err, hinv_block[i, i:], alpha=-1)
    loss = (err_block**2).sum(dim=1) / 2  # (w - q)^2 / d^2 / 2 per column, summed
    return q_block, err_block, loss, mask


# Columns swept with rank-1 updates before one lazy GEMM brings the rest of the layer up to date. The lazy update
# is exact, so this only trades many memory-bound rank-1 updates for small GEMMs; masks are still chosen per
# ``blocksize`` columns as published. 16 keeps the per-column updates in cache on a CPU.
SWEEP_WIDTH = 16


def _sweep_width(blocksize: int, prune_m: int, groupsize: int) -> int:
    """SWEEP_WIDTH where it tiles blocks, N:M groups and quantization groups; else the whole block."""
    fits = blocksize % SWEEP_WIDTH == 0 and (not prune_m or SWEEP_WIDTH % prune_m == 0)
    fits = fits and (not groupsize or SWEEP_WIDTH % groupsize == 0 or groupsize % SWEEP_WIDTH == 0)
    return SWEEP_WIDTH if fits else blocksize


def check_blocking(blocksize: int, prune_m: int, bits: int, groupsize: int) -> None:
    """The block structure SparseGPT needs: N:M groups and quantization groups tile the mask blocks."""
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    if prune_m and blocksize % prune_m:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M={prune_m}")
    if bits and groupsize and blocksize % groupsize and groupsize % blocksize:
        raise ValueError(f"groupsize {groupsize} must divide blocksize {blocksize} or be a multiple of it")


LAZY_PRECISIONS = ("ieee", "tf32")


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 values rounded to TF32's 10 mantissa bits (to nearest, ties away from zero): what a TF32 tensor-core
    GEMM sees of its fp32 operands. Lets a CPU run show the effect of a TF32 lazy update on the result."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def sparsegpt_prune(
    weight: torch.Tensor,
    hinv_upper: torch.Tensor,
    sparsity: float,
    prune_n: int = 0,
    prune_m: int = 0,
    blocksize: int = 128,
    bits: int = 0,
    groupsize: int = 0,
    lazy_precision: str = "ieee",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prune (and optionally quantize) a whole layer. See the module docstring for the math.

    weight: [rows, cols] any float dtype (dead input columns already zeroed by the caller).
    hinv_upper: [cols, cols] U from :func:`~sparsekern.reference.hessian.hinv_cholesky`.
    sparsity: fraction of zeros for unstructured masks (ignored when prune_n > 0).
    groupsize: 0 = one grid per row; else must divide ``blocksize`` or be a multiple of it.
    lazy_precision: operands of the lazy update GEMM: "ieee" (fp32) or "tf32" (rounded to TF32 first, fp32
        accumulation, as tensor cores do; fp32 inputs only).
    Returns (pruned weight [rows, cols] in the compute dtype, loss [rows], scale [rows, G], zero [rows, G]),
    G = number of quantization groups (1 per row without groups; 0 columns when bits == 0).
    """
    dtype = compute_dtype(weight.dtype)
    check_blocking(blocksize, prune_m, bits, groupsize)
    tf32 = lazy_precision == "tf32" and dtype == torch.float32
    w = weight.to(dtype, copy=True)
    hinv = hinv_upper.to(dtype)
    rows, cols = w.shape
    ngroups = 0 if not bits else (1 if not groupsize else -(-cols // groupsize))
    scales = torch.zeros(rows, ngroups, dtype=dtype, device=w.device)
    zeros = torch.zeros_like(scales)
    if bits and not groupsize:
        scales[:, 0], zeros[:, 0] = minmax_params(w, bits)
    losses = torch.zeros(rows, dtype=dtype, device=w.device)
    diag = torch.diagonal(hinv)
    width = _sweep_width(blocksize, prune_m, groupsize if bits else 0)  # divides blocksize
    for b1 in range(0, cols, blocksize):
        b2 = min(b1 + blocksize, cols)
        block_mask = None
        if not prune_n:  # adaptive mask: the block's scores once every earlier column's update has reached it
            scores = w[:, b1:b2].square() / diag[b1:b2].square()
            block_mask = tensor_mask(scores, prune_count(scores.numel(), sparsity))
        for i1 in range(b1, b2, width):
            i2 = min(i1 + width, b2)
            prune_mask = None if prune_n else block_mask[:, i1 - b1 : i2 - b1]
            scale, zero, sweep_groupsize = (scales, zeros, 0) if bits else (None, None, 0)
            if bits and groupsize >= width:  # the group's grid, taken where the group starts
                g = i1 // groupsize
                if i1 % groupsize == 0:
                    scales[:, g], zeros[:, g] = minmax_params(w[:, i1 : i1 + groupsize], bits)
                scale, zero = scales[:, g : g + 1], zeros[:, g : g + 1]
            elif bits and groupsize:  # groups inside the segment: the sweep computes their grids in place
                g0, g1 = i1 // groupsize, -(-i2 // groupsize)
                scale, zero, sweep_groupsize = scales[:, g0:g1], zeros[:, g0:g1], groupsize
            q, err, loss, _ = sparsegpt_sweep(w[:, i1:i2], hinv[i1:i2, i1:i2], prune_mask, prune_n, prune_m, bits,
                                              scale, zero, sweep_groupsize)
            w[:, i1:i2] = q
            losses += loss
            if tf32:  # the lazy batch update of every column right of the segment
                w[:, i2:] -= round_to_tf32(err) @ round_to_tf32(hinv[i1:i2, i2:])
            else:
                w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return w, losses, scales, zeros
