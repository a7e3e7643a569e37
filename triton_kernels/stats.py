"""Calibration statistics: the streaming SparseGPT Hessian and Wanda's running per-channel mean of squares.

Both fold one batch of layer inputs x [..., k] (flattened to m rows) into a running mean over the ``count`` rows
seen so far, in place and in one launch, and return the new count ``count + m`` (the reference's contract,
``sparsekern.reference.hessian_update`` / ``sumsq_update``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import INTERPRETING

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The interpreter pays per operation and per program, not per register, so it runs big tiles: (output tile,
# rows per step) for the Hessian, (columns, rows per step) for the sum of squares. Tests shrink them to cover
# several tiles and ragged edges on small inputs.
INTERPRETER_HESSIAN_TILES = (512, 512)
INTERPRETER_SUMSQ_TILES = (1024, 256)


@triton.jit
def _hessian_update_kernel(
    h_ptr, x_ptr, m, k, stride_xm, stride_xk, keep, scale,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One [BLOCK, BLOCK] tile (ti, tj), ti <= tj, of H <- keep * H + scale * X^T X, mirrored into (tj, ti).

    keep = count / (count + m), scale = 2 / (count + m): the reference's H <- (count * H + 2 X^T X) / (count + m).
    X^T X accumulates in fp32 over the m rows, BLOCK_M at a time. H is symmetric, so only the tiles on or above
    the diagonal are computed (half the flops); each writes its upper-triangle elements and their mirror images,
    which makes the result exactly symmetric. The result depends only on the upper triangle of the old H.
    """
    ti = tl.program_id(0)
    tj = tl.program_id(1)
    if ti > tj:
        return  # the mirror of tile (tj, ti), written by that program
    rows = ti * BLOCK + tl.arange(0, BLOCK)  # rows of H = columns of x
    cols = tj * BLOCK + tl.arange(0, BLOCK)
    offs_m = tl.arange(0, BLOCK_M)
    # x[:, rows] and x[:, cols] loaded as [BLOCK_M, BLOCK] tiles (coalesced along k); the first is transposed
    # for the dot (tl.trans: a layout change, which half-precision tensor-core operands take from shared memory).
    # The offsets within one step are int32 (at most BLOCK_M rows x k); the scalar base pointer advances by
    # BLOCK_M rows per step, since m * k can exceed int32 (262144 x 28672). Tensors of 64-bit pointers carried
    # through the loop would cost two registers per element and spill.
    xr_offs = offs_m[:, None] * stride_xm + rows[None, :] * stride_xk
    x_offs = offs_m[:, None] * stride_xm + cols[None, :] * stride_xk
    base = x_ptr
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for m0 in range(0, m, BLOCK_M):
        in_m = (m0 + offs_m) < m
        xt = tl.trans(tl.load(base + xr_offs, mask=in_m[:, None] & (rows[None, :] < k), other=0.0))
        xc = tl.load(base + x_offs, mask=in_m[:, None] & (cols[None, :] < k), other=0.0)
        if UPCAST:
            # bf16 tl.dot gives wrong results in the interpreter (triton 3.9 on CPU); the product of two bf16
            # values is exact in fp32, so the fp32 dot the interpreter does (exactly) is the same math.
            xt = xt.to(tl.float32)
            xc = xc.to(tl.float32)
        # Half inputs go to the tensor cores as they are (exact products, fp32 accumulation); fp32 inputs use
        # INPUT_PRECISION ("ieee": exact fp32 like the reference, instead of the GPU's default tf32).
        acc = tl.dot(xt, xc, acc, input_precision=INPUT_PRECISION)
        base += BLOCK_M * stride_xm

    in_k = (rows[:, None] < k) & (cols[None, :] < k)
    # k * k can exceed int32 (k > 46340): the tile's corner is a 64-bit scalar, offsets inside it stay int32.
    local_r = tl.arange(0, BLOCK)[:, None]
    local_c = tl.arange(0, BLOCK)[None, :]
    tile = h_ptr + (ti * BLOCK).to(tl.int64) * k + tj * BLOCK
    mirror = h_ptr + (tj * BLOCK).to(tl.int64) * k + ti * BLOCK
    h = tl.load(tile + local_r * k + local_c, mask=in_k, other=0.0)
    new = h * keep + acc * scale
    # A diagonal tile writes its upper triangle, and the strictly upper part again mirrored; an off-diagonal
    # tile (all rows < cols) writes itself and its mirror whole.
    offsets = local_r * k + local_c
    tl.store(tile + offsets, new, mask=in_k & (rows[:, None] <= cols[None, :]))
    # The mirror is the transposed tile, stored row by row (coalesced) at the same offsets.
    mirror_mask = in_k & (rows[:, None] < cols[None, :])
    tl.store(mirror + offsets, tl.trans(new), mask=tl.trans(mirror_mask))


def hessian_update(hessian: torch.Tensor, x: torch.Tensor, count: int, *, input_precision: str = "ieee") -> int:
    """H <- (count * H + 2 X^T X) / (count + m) in place; returns count + m (m = rows of x; m = 0: no change).

    hessian: [k, k] fp32 contiguous and symmetric; x: [..., k] fp32/fp16/bf16 (other float dtypes are converted
    to fp32, as the reference does). ``input_precision`` ("ieee" or "tf32") is the tl.dot precision for fp32 x
    on the GPU, for benchmarks; the op always uses the exact "ieee".
    """
    if input_precision not in ("ieee", "tf32"):
        raise ValueError(f"input_precision must be 'ieee' or 'tf32', got {input_precision!r}")
    x = _as_rows(hessian, x, "hessian", dims=2)
    m, k = x.shape
    total = count + m
    if m == 0 or k == 0:
        return total
    # Output tiles of 128 (64 for k <= 64, ... down to tl.dot's minimum of 16): 128 x 128 is the usual
    # tensor-core tile on an H100, large enough to reuse each loaded row 128 times and small enough that
    # k = 4096 still gives 528 upper-triangle tiles for 132 SMs. BLOCK_M (the GEMM's reduction step) of 64 half
    # or 32 fp32 values is 128 bytes per row either way: 32 KiB of operands per stage, 3 stages in shared memory.
    # ptxas (triton 3.9, sm_90a) gives this 255 registers with a few spilled (36 bytes fp32, 152 bf16); 64-wide
    # tiles do not spill but halve the reuse of each loaded row. To be settled by timing on an H100.
    block = min(128, max(16, triton.next_power_of_2(k)))
    block_m = 32 if x.dtype == torch.float32 else 64
    interpreted = INTERPRETING
    if interpreted:
        block, block_m = INTERPRETER_HESSIAN_TILES
        block = min(block, max(16, triton.next_power_of_2(k)))
    upcast = x.dtype == torch.bfloat16 and interpreted
    tiles = triton.cdiv(k, block)
    _hessian_update_kernel[(tiles, tiles)](
        hessian, x, m, k, x.stride(0), x.stride(1), count / total, 2.0 / total,
        BLOCK=block, BLOCK_M=block_m, INPUT_PRECISION=input_precision, UPCAST=upcast,
        num_warps=8 if block == 128 else 4, num_stages=3,
    )
    return total


@triton.jit
def _sumsq_partial_kernel(out_ptr, x_ptr, m, k, rows_per_split, stride_xm, stride_xk,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[split, cols] = sum over this split's rows of x[row, cols]^2, in fp32.

    Program (column tile, split) owns BLOCK_K columns of rows [split * rows_per_split, ...): the splits fill the
    GPU when k alone gives too few programs, and the partial sums are added in a fixed order afterwards, so the
    result is deterministic (no atomics). A [BLOCK_M, BLOCK_K] accumulator takes elementwise adds in the loop
    and is reduced over rows once at the end.
    """
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    in_k = cols < k
    start = split * rows_per_split
    stop = tl.minimum(start + rows_per_split, m)
    # int32 offsets within a step from a scalar 64-bit base that advances (m * k can exceed int32); a tensor of
    # 64-bit pointers carried through the loop would cost two registers per element.
    offsets = offs_m[:, None] * stride_xm + cols[None, :] * stride_xk
    base = x_ptr + start.to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for m0 in range(start, stop, BLOCK_M):
        v = tl.load(base + offsets, mask=((m0 + offs_m) < stop)[:, None] & in_k[None, :], other=0.0)
        v = v.to(tl.float32)
        acc += v * v
        base += BLOCK_M * stride_xm
    tl.store(out_ptr + split.to(tl.int64) * k + cols, tl.sum(acc, axis=0), mask=in_k)


def sumsq_update(sumsq: torch.Tensor, x: torch.Tensor, count: int) -> int:
    """sumsq <- (count * sumsq + sum_rows(x^2)) / (count + m) in place; returns count + m.

    sumsq: [k] fp32 contiguous; x: [..., k] any float dtype (squared in fp32).
    """
    x = _as_rows(sumsq, x, "sumsq", dims=1)
    m, k = x.shape
    total = count + m
    if m == 0 or k == 0:
        return total
    # Tall-skinny x (m = 8 x 2048 rows per batch, k = 4096..28672 on the GPU) is read once: bandwidth-bound.
    # 32 columns per program is one 64-byte segment of a half row (two full 32-byte sectors); 128 rows per step
    # keep the kernel at 117 registers (ptxas, sm_90a), so four programs share an SM. Rows are split so that
    # there are about four programs per SM in all (k = 4096 alone gives only 128 column tiles).
    block_k, block_m = 32, 128
    if not x.is_cuda:
        block_k, block_m = INTERPRETER_SUMSQ_TILES
        block_k = min(block_k, max(16, triton.next_power_of_2(k)))
    column_tiles = triton.cdiv(k, block_k)
    splits = _row_splits(m, block_m, column_tiles, x.device)
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), block_m) * block_m
    splits = triton.cdiv(m, rows_per_split)
    partial = torch.empty(splits, k, dtype=torch.float32, device=x.device)
    _sumsq_partial_kernel[(column_tiles, splits)](
        partial, x, m, k, rows_per_split, x.stride(0), x.stride(1), BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4,
    )
    sumsq.mul_(count / total).add_(partial.sum(dim=0), alpha=1.0 / total)
    return total


def _row_splits(m: int, block_m: int, column_tiles: int, device: torch.device) -> int:
    """How many row ranges make about four programs per SM (at least 4 steps of rows each); 1 off the GPU."""
    if device.type != "cuda":
        return 1
    programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(m, 4 * block_m), programs // column_tiles))


def _as_rows(stat: torch.Tensor, x: torch.Tensor, name: str, dims: int) -> torch.Tensor:
    """x as [m, k] rows in a kernel dtype (a view when the leading dims allow it; the kernels take any strides),
    after checking that the running statistic is fp32, contiguous, on x's device and [k] * dims."""
    if not x.is_floating_point() or x.dim() == 0:
        raise ValueError(f"x must be a floating-point tensor [..., k], got {x.dtype} of shape {tuple(x.shape)}")
    expected = (x.shape[-1],) * dims
    if tuple(stat.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(stat.shape)}, expected {expected} for x of shape {tuple(x.shape)}")
    if stat.dtype != torch.float32 or not stat.is_contiguous():
        raise ValueError(f"{name} must be a contiguous float32 tensor, got {stat.dtype} "
                         f"(contiguous: {stat.is_contiguous()})")
    if stat.device != x.device:
        raise ValueError(f"{name} is on {stat.device} but x is on {x.device}; move them to one device")
    if x.dtype not in _KERNEL_DTYPES:
        x = x.to(torch.float32)
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
