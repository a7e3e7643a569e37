"""SparseGPT's OBS column sweep fused into one launch per block, and the whole-layer op built on it.

``sparsegpt_sweep`` (one launch): each program owns BLOCK_R rows of a block of at most 256 columns and keeps
that [BLOCK_R, block] tile of W in registers while it walks the columns i = 0, 1, ... with d = U[i, i]:
    every M columns (N:M): prune the N lowest scores w^2 / d^2 of the next M columns (ranks, ties by position)
    every GROUPSIZE columns (quantization groups): the min-max grid of the next GROUPSIZE columns
    q    = w masked (0 where pruned), rounded to the grid when BITS > 0
    err  = (w - q) / d;  loss += err^2 / 2
    W[:, j] -= err * U[i, j] for j > i, and W[:, i] = q
U's rows are read from global memory (they are shared by every program, so they stay in L2). The program
writes Q, Err (for the lazy update), the mask and the loss. Same math as ``reference.sparsegpt_sweep``.

``sweep_segment`` is the same launch writing into caller-owned buffers (Q into the segment itself, the loss
accumulated); ``lazy_update`` is the batched update W[:, i2:] -= Err @ U[i1:i2, i2:] after a segment, one GEMM in
fp32 ("ieee", exact) or TF32 ("tf32"). The whole-layer op ``sparsegpt_prune`` is the production loop
``sparsekern.prune.sparsegpt_loop`` with these launchers and ``select.lowest_k_mask`` plugged in; this module
holds kernels and launchers only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._outputs import new_output

# The interpreter pays per operation and per program, not per register, so it runs big tiles: rows per sweep
# program, and (rows, columns, inner) tiles of the lazy update. Tests shrink them to cover several programs.
INTERPRETER_SWEEP_ROWS = 1024
INTERPRETER_LAZY_TILES = (256, 256, 128)
MAX_SWEEP_COLUMNS = 256  # the register tile of a program is [BLOCK_R, next_power_of_2(columns)]


@triton.jit
def _round_half_even(x):
    """torch.round (half to even) without libdevice, which the interpreter lacks; x - floor(x) is exact."""
    low = tl.floor(x)
    frac = x - low
    odd = (low - 2.0 * tl.floor(low * 0.5)) == 1.0
    return low + ((frac > 0.5) | ((frac == 0.5) & odd)).to(tl.float32)


@triton.jit
def _sparsegpt_sweep_kernel(
    w_ptr, stride_wr, stride_wc,
    u_ptr, stride_ur, stride_uc,
    prune_ptr, stride_pr, stride_pc,
    q_ptr, stride_qr, stride_qc,
    err_ptr, stride_er, stride_ec,
    mask_ptr, stride_mr, loss_ptr,
    scale_ptr, zero_ptr, stride_sr, stride_sc,
    rows, cols,
    PRUNE_N: tl.constexpr, PRUNE_M: tl.constexpr, HAS_MASK: tl.constexpr,
    BITS: tl.constexpr, MAXQ: tl.constexpr, GROUPSIZE: tl.constexpr, ADD_LOSS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    col = tl.arange(0, BLOCK_B)
    row_ok = row < rows
    col_ok = col < cols
    tile_ok = row_ok[:, None] & col_ok[None, :]
    row = row.to(tl.int64)
    w = tl.load(w_ptr + row[:, None] * stride_wr + col[None, :] * stride_wc, mask=tile_ok, other=0.0)
    w = w.to(tl.float32)
    diag = tl.load(u_ptr + col * (stride_ur + stride_uc), mask=col_ok, other=1.0).to(tl.float32)
    if HAS_MASK:
        pruned = tl.load(prune_ptr + row[:, None] * stride_pr + col[None, :] * stride_pc, mask=tile_ok, other=0) != 0
    else:
        pruned = tl.zeros([BLOCK_R, BLOCK_B], dtype=tl.int1)
    errs = tl.zeros([BLOCK_R, BLOCK_B], dtype=tl.float32)
    loss = tl.zeros([BLOCK_R], dtype=tl.float32)
    if BITS > 0 and GROUPSIZE == 0:  # one grid per row, given
        scale = tl.load(scale_ptr + row * stride_sr, mask=row_ok, other=1.0).to(tl.float32)
        zero = tl.load(zero_ptr + row * stride_sr, mask=row_ok, other=0.0).to(tl.float32)
    else:
        scale = tl.full([BLOCK_R], 1.0, tl.float32)
        zero = tl.zeros([BLOCK_R], dtype=tl.float32)

    for i in range(0, cols):
        at_i = (col == i)[None, :]
        if PRUNE_N > 0:
            if i % PRUNE_M == 0:
                # Rank each of the next M scores within its row's group: how many members score lower (or the
                # same, further left). The N lowest ranks are pruned.
                scores = w * w / (diag * diag)[None, :]
                rank = tl.zeros([BLOCK_R, BLOCK_B], dtype=tl.int32)
                for j in tl.static_range(PRUNE_M):
                    member = tl.sum(tl.where((col == i + j)[None, :], scores, 0.0), axis=1)[:, None]
                    rank += ((member < scores) | ((member == scores) & (col[None, :] > i + j))).to(tl.int32)
                in_group = ((col >= i) & (col < i + PRUNE_M))[None, :]
                pruned = tl.where(in_group, rank < PRUNE_N, pruned)
        if GROUPSIZE > 0:
            if i % GROUPSIZE == 0:
                # Min-max grid of the group from the weights as updated so far (as the reference does).
                in_group = ((col >= i) & (col < i + GROUPSIZE) & col_ok)[None, :]
                lo = tl.minimum(tl.min(tl.where(in_group, w, float("inf")), axis=1), 0.0)
                hi = tl.maximum(tl.max(tl.where(in_group, w, float("-inf")), axis=1), 0.0)
                flat = (lo == 0.0) & (hi == 0.0)
                lo = tl.where(flat, -1.0, lo)
                hi = tl.where(flat, 1.0, hi)
                scale = (hi - lo) / MAXQ
                zero = _round_half_even(-lo / scale)
                group = i // GROUPSIZE
                tl.store(scale_ptr + row * stride_sr + group * stride_sc, scale, mask=row_ok)
                tl.store(zero_ptr + row * stride_sr + group * stride_sc, zero, mask=row_ok)
        w_i = tl.sum(tl.where(at_i, w, 0.0), axis=1)
        pruned_i = tl.max(tl.where(at_i & pruned, 1, 0), axis=1) > 0
        q = tl.where(pruned_i, 0.0, w_i)
        if BITS > 0:
            levels = tl.minimum(tl.maximum(_round_half_even(q / scale) + zero, 0.0), MAXQ)
            q = tl.where(pruned_i, 0.0, scale * (levels - zero))
        d = tl.load(u_ptr + i * (stride_ur + stride_uc)).to(tl.float32)
        err = (w_i - q) / d
        loss += err * err
        u_row = tl.load(u_ptr + i * stride_ur + col * stride_uc, mask=col_ok & (col > i), other=0.0).to(tl.float32)
        w = tl.where(at_i, q[:, None], w - err[:, None] * u_row[None, :])
        errs = tl.where(at_i, err[:, None], errs)

    tl.store(q_ptr + row[:, None] * stride_qr + col[None, :] * stride_qc, w.to(q_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(err_ptr + row[:, None] * stride_er + col[None, :] * stride_ec, errs, mask=tile_ok)
    tl.store(mask_ptr + row[:, None] * stride_mr + col[None, :], pruned.to(tl.uint8), mask=tile_ok)
    loss = loss * 0.5
    if ADD_LOSS:
        loss += tl.load(loss_ptr + row, mask=row_ok, other=0.0)
    tl.store(loss_ptr + row, loss, mask=row_ok)


@triton.jit
def _lazy_update_kernel(
    w_ptr, stride_wr, stride_wc,
    e_ptr, stride_er, stride_ec,
    u_ptr, stride_ur, stride_uc,
    rows, cols, inner,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """W[rows, cols] -= E[rows, inner] @ U[inner, cols], in place, fp32 accumulation."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm_ok = rm < rows
    rn_ok = rn < cols
    rm = rm.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, inner, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        rk_ok = rk < inner
        e = tl.load(e_ptr + rm[:, None] * stride_er + rk[None, :] * stride_ec, mask=rm_ok[:, None] & rk_ok[None, :],
                    other=0.0)
        u = tl.load(u_ptr + rk[:, None] * stride_ur + rn[None, :] * stride_uc, mask=rk_ok[:, None] & rn_ok[None, :],
                    other=0.0)
        acc = tl.dot(e, u, acc, input_precision=INPUT_PRECISION)
    w_ptrs = w_ptr + rm[:, None] * stride_wr + rn[None, :] * stride_wc
    tile_ok = rm_ok[:, None] & rn_ok[None, :]
    tl.store(w_ptrs, tl.load(w_ptrs, mask=tile_ok, other=0.0) - acc, mask=tile_ok)


def sweep_segment(block, hinv_block, prune_mask, prune_n, prune_m, bits, scale, zero, groupsize,
                  q, err, mask, loss, add_loss):
    """One sweep launch into the given outputs (q may be ``block`` itself: each program reads its tile before it
    writes it); ``add_loss`` adds the loss into ``loss`` instead of overwriting it."""
    rows, cols = block.shape
    block_b = max(16, triton.next_power_of_2(cols))
    # Small row tiles on a GPU give every SM programs to run (4096 rows -> 256 programs) and keep the three
    # [rows, block] register tiles (W, Err, mask) unspilled; the interpreter pays per operation, so it takes
    # as many rows per program as it can.
    block_r = 16 if block.is_cuda else min(INTERPRETER_SWEEP_ROWS, max(16, triton.next_power_of_2(rows)))
    has_mask = prune_mask is not None and not prune_n
    prune = prune_mask.view(torch.uint8) if has_mask else mask  # unread when there is no given mask
    grid_scale = scale if bits else loss  # unread without quantization
    grid_zero = zero if bits else loss
    _sparsegpt_sweep_kernel[(triton.cdiv(rows, block_r),)](
        block, block.stride(0), block.stride(1),
        hinv_block, hinv_block.stride(0), hinv_block.stride(1),
        prune, prune.stride(0), prune.stride(1),
        q, q.stride(0), q.stride(1),
        err, err.stride(0), err.stride(1),
        mask.view(torch.uint8), mask.stride(0), loss,
        grid_scale, grid_zero, grid_scale.stride(0) if bits else 0, grid_scale.stride(1) if bits else 0,
        rows, cols,
        PRUNE_N=prune_n, PRUNE_M=max(prune_m, 1), HAS_MASK=has_mask,
        BITS=bits, MAXQ=float(2**bits - 1), GROUPSIZE=groupsize if bits else 0, ADD_LOSS=add_loss,
        BLOCK_R=block_r, BLOCK_B=block_b, num_warps=4,
    )


def sparsegpt_sweep(block, hinv_block, prune_mask=None, prune_n=0, prune_m=0, bits=0, scale=None, zero=None,
                    groupsize=0):
    """Fused version of ``reference.sparsegpt_sweep`` (same arguments and results; block of at most 256 columns,
    fp32/fp16/bf16: ``ops`` sends fp64 to the reference)."""
    rows, cols = block.shape
    if cols > MAX_SWEEP_COLUMNS:
        raise ValueError(f"a fused sweep takes at most {MAX_SWEEP_COLUMNS} columns, got {cols}; sweep wider "
                         "blocks in segments with lazy updates between them, as sparsegpt_prune does")
    device = block.device
    q = new_output((rows, cols), torch.float32, device)
    err = new_output((rows, cols), torch.float32, device)
    mask = new_output((rows, cols), torch.bool, device)
    loss = new_output((rows,), torch.float32, device)
    sweep_segment(block, hinv_block.float(), prune_mask, prune_n, prune_m, bits, scale, zero, groupsize,
                  q, err, mask, loss, add_loss=False)
    return q, err, loss, mask


def lazy_update(weight: torch.Tensor, err: torch.Tensor, hinv_rows: torch.Tensor, precision: str = "ieee") -> None:
    """weight -= err @ hinv_rows in place (fp32). precision: "ieee" (exact fp32) or "tf32" (tensor cores)."""
    rows, cols = weight.shape
    if rows == 0 or cols == 0:
        return
    # GPU: 64x64 fp32 accumulator tiles, 4 warps (TF32 and FMA paths alike): 156 registers, no spills (ptxas,
    # sm_90a).
    block_m, block_n, block_k = (64, 64, 32) if weight.is_cuda else INTERPRETER_LAZY_TILES
    grid = (triton.cdiv(rows, block_m), triton.cdiv(cols, block_n))
    _lazy_update_kernel[grid](
        weight, weight.stride(0), weight.stride(1),
        err, err.stride(0), err.stride(1),
        hinv_rows, hinv_rows.stride(0), hinv_rows.stride(1),
        rows, cols, err.shape[1],
        INPUT_PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
