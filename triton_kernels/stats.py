"""Calibration statistics: the streaming SparseGPT Hessian and Wanda's running per-channel mean of squares.

Both fold one batch of layer inputs x [..., k] (flattened to m rows) into a running mean over the ``count`` rows
seen so far, in place and in one launch, and return the new count ``count + m`` (the reference's contract,
``sparsekern.reference.hessian_update`` / ``sumsq_update``).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
    _check(hessian, x, "hessian", dims=2)
    if input_precision not in ("ieee", "tf32"):
        raise ValueError(f"input_precision must be 'ieee' or 'tf32', got {input_precision!r}")
    k = hessian.shape[0]
    m = math.prod(x.shape[:-1])
    if m == 0:
        return count
    total = count + m
    if k == 0:
        return total
    if x.dtype not in _KERNEL_DTYPES:
        x = x.to(torch.float32)
    x = x.reshape(m, k)  # a view when the leading dims allow it; the kernel takes any strides
    # Output tiles of 128 (64 for k <= 64, ... down to tl.dot's minimum of 16): 128 x 128 is the usual
    # tensor-core tile on an H100, large enough to reuse each loaded row 128 times and small enough that
    # k = 4096 still gives 528 upper-triangle tiles for 132 SMs. BLOCK_M (the GEMM's reduction step) of 64 half
    # or 32 fp32 values is 128 bytes per row either way: 32 KiB of operands per stage, 3 stages in shared memory.
    block = min(128, max(16, triton.next_power_of_2(k)))
    block_m = 32 if x.dtype == torch.float32 else 64
    upcast = x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    tiles = triton.cdiv(k, block)
    _hessian_update_kernel[(tiles, tiles)](
        hessian, x, m, k, x.stride(0), x.stride(1), count / total, 2.0 / total,
        BLOCK=block, BLOCK_M=block_m, INPUT_PRECISION=input_precision, UPCAST=upcast,
        num_warps=8 if block == 128 else 4, num_stages=3,
    )
    return total


@triton.jit
def _sumsq_update_kernel(s_ptr, x_ptr, m, k, stride_xm, stride_xk, keep, inv_total,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Columns [pid * BLOCK_K, ...) of s <- keep * s + inv_total * sum_rows(x^2), squares summed in fp32.

    keep = count / (count + m), inv_total = 1 / (count + m): the running mean of squares per input channel.
    Each program owns its columns and loops over all m rows, so the sum is deterministic (no atomics): a
    [BLOCK_M, BLOCK_K] accumulator takes elementwise adds in the loop and is reduced over rows once at the end.
    """
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    in_k = cols < k
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + cols[None, :] * stride_xk
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, m, BLOCK_M):
        v = tl.load(x_ptrs, mask=((m0 + offs_m) < m)[:, None] & in_k[None, :], other=0.0).to(tl.float32)
        acc += v * v
        x_ptrs += BLOCK_M * stride_xm  # pointer steps: m * k can exceed int32
    s = tl.load(s_ptr + cols, mask=in_k, other=0.0)
    tl.store(s_ptr + cols, s * keep + tl.sum(acc, axis=0) * inv_total, mask=in_k)


def sumsq_update(sumsq: torch.Tensor, x: torch.Tensor, count: int) -> int:
    """sumsq <- (count * sumsq + sum_rows(x^2)) / (count + m) in place; returns count + m.

    sumsq: [k] fp32 contiguous; x: [..., k] any float dtype (squared in fp32).
    """
    _check(sumsq, x, "sumsq", dims=1)
    k = sumsq.shape[0]
    m = math.prod(x.shape[:-1])
    if m == 0:
        return count
    total = count + m
    if k == 0:
        return total
    if x.dtype not in _KERNEL_DTYPES:
        x = x.to(torch.float32)
    x = x.reshape(m, k)
    # Tall-skinny x (m = 128 x 2048 rows, k = 4096..28672 on the GPU) is read once, so this is bandwidth-bound.
    # 32 columns per program is one 64-byte segment of a half row (two full 32-byte sectors) and, at k = 4096,
    # 128 programs for the H100's 132 SMs; each reads 256 rows per step (16 KiB of half values in flight).
    block_k = 32
    _sumsq_update_kernel[(triton.cdiv(k, block_k),)](
        sumsq, x, m, k, x.stride(0), x.stride(1), count / total, 1.0 / total,
        BLOCK_M=256, BLOCK_K=block_k, num_warps=4,
    )
    return total


def _check(stat: torch.Tensor, x: torch.Tensor, name: str, dims: int) -> None:
    """The running statistic must be fp32, contiguous, on x's device and [k] * dims for x [..., k]."""
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
