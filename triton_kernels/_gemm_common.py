"""What the compressed-weight GEMMs share (``sparse24_gemm``, ``bitmap_gemm``): the SM count, the split-K choice
and the deterministic split-K reduction.

Split-K is deterministic: program (tile, s) writes its fp32 partial sum over its K range to a workspace [S, M, N];
``_splitk_reduce_kernel`` adds the S partials in order (s = 0, 1, ...), adds the bias and casts to y's dtype. fp32
atomics would also need a zeroed workspace and a final cast (as many launches) and make y depend on the order in
which programs finish.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# A split keeps at least this many BLOCK_K iterations, so that its pipeline has something to overlap.
MIN_ITERS_PER_SPLIT = 2
REDUCE_BLOCK = 1024


@triton.jit
def _splitk_reduce_kernel(ws_ptr, bias_ptr, y_ptr, total, N,
                          SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y[i] = sum_s ws[s, i] (s = 0, 1, ... in order) + bias[i % N], cast to y's dtype; i over the M * N outputs."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    acc = tl.load(ws_ptr + offs, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLITS):
        acc += tl.load(ws_ptr + s * total + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in grouped order: GROUP_M tiles of M per band of N, so that a band of
    compressed weight stays in L2 while the band's tiles reuse it."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_band = GROUP_M * num_pid_n
    first_m = (pid // per_band) * GROUP_M
    band_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % per_band) % band_m, (pid % per_band) // band_m


@triton.jit
def dot_swap_ab(tile, x, acc, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] += tile [BLOCK_N, BLOCK_K] @ x[BLOCK_M, BLOCK_K]^T (weight first: "swap AB")."""
    if DOT_FP32:
        # Interpreter only: its bf16 tl.dot is wrong; fp32 operands give the same exact products.
        acc = tl.dot(tile.to(tl.float32), tl.trans(x.to(tl.float32)), acc, input_precision="ieee")
    else:
        acc = tl.dot(tile, tl.trans(x), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def store_swapped_tile(acc, out_ptr, bias_ptr, split, rm, rn, m_ok, n_ok, stride_os, stride_om, stride_on,
                       PARTIAL: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Store acc [BLOCK_N, BLOCK_M] at out[split, rm, rn]: fp32 partial sums (PARTIAL, for the split-K reduction),
    else + bias[n] and cast to out's dtype."""
    out_ok = n_ok[:, None] & m_ok[None, :]
    out_ptrs = (out_ptr + split.to(tl.int64) * stride_os + rm.to(tl.int64)[None, :] * stride_om
                + rn.to(tl.int64)[:, None] * stride_on)
    if PARTIAL:
        tl.store(out_ptrs, acc, mask=out_ok)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_ok)


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device, interpreter_sms: int) -> int:
    """The SMs of a CUDA device; ``interpreter_sms`` (the calling module's stand-in) for the interpreter's CPU."""
    if device.type != "cuda":
        return interpreter_sms
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


def split_count(programs: int, iters: int, wanted: int, sms: int, min_iters: int = MIN_ITERS_PER_SPLIT) -> int:
    """Splits of K for ``programs`` output tiles of ``iters`` BLOCK_K steps each, aiming at ``wanted`` programs in
    all when the tiles alone leave SMs idle (programs < sms); 1 otherwise. A split keeps >= ``min_iters`` steps.

    A count that divides the iterations gives every split the same trip count (no K masks when K is a multiple of
    BLOCK_K); failing one close enough, ceil(iters / splits) each and the last split's excess iterations masked off
    (none is left empty)."""
    if programs >= sms:
        return 1
    want = max(1, min(triton.cdiv(wanted, programs), iters // min_iters))
    divisor = max(d for d in range(1, want + 1) if iters % d == 0)
    return divisor if 2 * divisor >= want else triton.cdiv(iters, triton.cdiv(iters, want))


def splitk_reduce(workspace: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> None:
    """y [M, N] (contiguous) = sum over s of workspace [S, M, N] fp32 (contiguous), in order, + bias [N]."""
    splits, m, n = workspace.shape
    has_bias = bias is not None
    _splitk_reduce_kernel[(triton.cdiv(m * n, REDUCE_BLOCK),)](
        workspace, bias if has_bias else workspace, y, m * n, n,
        SPLITS=splits, HAS_BIAS=has_bias, BLOCK=REDUCE_BLOCK, num_warps=4,
    )
