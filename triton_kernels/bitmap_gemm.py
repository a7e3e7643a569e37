"""Unstructured sparse linear layer from the bitmap-compressed weight: ``bitmap_linear`` (reference
``reference.bitmap``).

    y[m, n] = sum_k x[m, k] * W[n, k] + bias[n],   W = decompress_bitmap(values, bitmap, offsets, K)   (fp32 acc.)

As for 2:4 (``sparse24_gemm``), Triton has no sparse tensor-core instruction, so the win is in bytes: the kernel
reads the compressed weight and expands each [BLOCK_N, BLOCK_K] tile to dense on chip right before ``tl.dot``.
Per 128-column tile of a row it reads 2 * 128 (1 - s) bytes of fp16/bf16 values, 16 bytes of bitmap and 4 of
offsets: 2(1 - s) + 0.156 bytes per weight against the dense 2 (57.8% at 50% sparsity, 37.8% at 70%; 2:4 reads
56%). Expansion of a tile (``_expand_bitmap``), BLOCK_K a multiple of 128 so that a step starts a format tile:

- the bitmap words [BLOCK_N, BLOCK_K/32] are shifted into one bit per column (broadcast over 32 lanes, reshape);
- the index in ``values`` of the kept entry at column c is offsets[n, k0/128] + the number of set bits before c
  in the step: the popcounts of the earlier words plus popcount(word & (2^j - 1)) (``_popcount``, plain integer
  ops); one offsets load per row and step (a wider step's later format tiles continue the same count,
  offsets[n, t + 1] = offsets[n, t] + the bits of tile t);
- one masked gather load of values (other = 0) gives the dense tile. A row's kept entries are consecutive in
  values, so neighbouring lanes of a row read neighbouring addresses (coalesced, up to the gaps).

Unlike 2:4's fixed 2 values per 4 columns, the values' addresses depend on the loaded bits and offsets (a
dependent, data-dependent load in every step): whether Triton's pipeliner overlaps it with the previous step's
dot as well as it overlaps plain loads is not measured yet (no GPU in the session that wrote this).

The weight tile is the dot's first operand, acc[BLOCK_N, BLOCK_M] = W_tile @ x_tile^T ("swap AB", see
``sparse24_gemm``): output features ride the MMA's large M dimension and tokens its N dimension (16 at decode).
Two configurations, chosen from M (rows of x after flattening its leading dims):

- decode (M <= 16): BLOCK_M = 16, BLOCK_N = 64, BLOCK_K = 128, 8 warps: per step ~8 KiB of compressed fp16 weight at 50%
  (values 8 KiB, bitmap 1 KiB, offsets 256 B). When N / BLOCK_N programs are fewer than the SMs, K is split for
  about 2 programs per SM, deterministically: a workspace [S, M, N] fp32 and ``_gemm_common``'s in-order
  reduction (with the bias and the cast), shared with ``sparse24_gemm``.
- prefill (M > 16): a tiled GEMM in grouped program order (GROUP_M tiles of M per band of N, so that a band of
  compressed weight stays in L2 while the band's tiles reuse it), BLOCK_K = 128, 64 x 128 (M x N) tiles for
  M <= 64, else 128 x 64. Split-K only when the tiles are fewer than the SMs.

fp32 x: exact fp32 products (``input_precision="ieee"``), smaller tiles. The tiles are chosen so that the compiled
kernels do not spill (registers below, from the sm_90a cubins); none is timed yet.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sparsekern.reference.bitmap import TILE

from . import INTERPRETING
from ._gemm_common import dot_swap_ab, grouped_tile, num_sms, split_count, splitk_reduce, store_swapped_tile
from ._outputs import new_output

_INTERPRETING = INTERPRETING  # bf16 tl.dot is wrong in the interpreter: bf16 tiles are upcast there (DOT_FP32)

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_K a multiple of TILE = 128. Registers per thread from
# the cubins triton 3.9 compiles for sm_90a (tests/gpu_compile.py's launches: no alignment hints), no spills:
DECODE_TILES = (16, 64, 128, 8, 3)  # 106 (split-K, ragged K: 110); on 4 warps 218
PREFILL_TILES_64 = (64, 128, 128, 8, 3)  # M <= 64: 246
PREFILL_TILES_128 = (128, 64, 128, 8, 3)  # 249 (128 x 128 tiles spill 456 bytes)
FP32_DECODE_TILES = (16, 32, 128, 4, 2)  # 102
FP32_PREFILL_TILES = (32, 64, 128, 8, 2)  # 195 (64 x 32 on 4 warps spills 320 bytes)
DECODE_MAX_M = 16
GROUP_M = 8
DECODE_PROGRAMS_PER_SM = 2
PREFILL_PROGRAMS_PER_SM = 1
# The interpreter has no SMs; this stands in for the count (tests raise it to force split-K on small shapes).
INTERPRETER_SMS = 4


@triton.jit
def _popcount(v):
    """Set bits of every int32 of v (SWAR: pair, nibble and byte sums, then the bytes added by a multiply). The
    arithmetic shifts' sign bits are masked off at once; the multiply wraps, and its top byte (<= 32) is the count.
    Plain integer ops, so the interpreter runs the same code as the GPU."""
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return (v * 0x01010101) >> 24


@triton.jit
def _expand_bitmap(values_ptr, words, start, cols_left, MASK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """Dense [BLOCK_N, BLOCK_K] tile from the bitmap words [BLOCK_N, BLOCK_K/32] of a step starting at a format
    tile (column k0 = 128t) and start = offsets[n, t] [BLOCK_N]: values[start + #set bits before c] where bit c
    is set, else 0. MASK_K: bits at c >= cols_left (past K) are cleared first (only a damaged bitmap has any, and
    they must not load past the row's values).

    The count before column 32w + j is the set bits of the step's earlier words (a cumsum over BLOCK_K/32 word
    counts) plus popcount(word & (2^j - 1)). A tl.cumsum over all BLOCK_K columns gives the same numbers but cost
    250 registers and 160 shuffles per iteration for the decode tile (sm_90a), against 106 registers and 2 here.
    """
    lane = tl.arange(0, 32)[None, None, :]
    if MASK_K:
        left = tl.minimum(tl.maximum(cols_left - tl.arange(0, BLOCK_K // 32) * 32, 0), 32)  # columns of each word
        words &= tl.where(left == 32, -1, (1 << tl.minimum(left, 31)) - 1)[None, :]  # their low bits
    counts = _popcount(words)
    before = tl.cumsum(counts, axis=1) - counts  # [BLOCK_N, BLOCK_K/32]: set bits in the step's earlier words
    low = _popcount(words[:, :, None] & ((1 << lane) - 1))  # (1 << 31) - 1 wraps to 0x7FFFFFFF: bits 0..30
    pos = tl.reshape(start[:, None, None] + before[:, :, None] + low, [BLOCK_N, BLOCK_K])
    kept = tl.reshape((words[:, :, None] >> lane) & 1, [BLOCK_N, BLOCK_K])  # the sign bits are masked off
    return tl.load(values_ptr + pos, mask=kept != 0, other=0.0)


@triton.jit
def _bitmap_gemm_kernel(
    x_ptr, values_ptr, bitmap_ptr, offsets_ptr, bias_ptr, out_ptr,
    M, N, K, words,
    stride_xm, stride_xk, stride_bn, stride_bw, stride_fn, stride_ft,
    stride_os, stride_om, stride_on,
    iters,
    HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, EVEN_K: tl.constexpr, DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[(s,) m, n] = sum over this program's K range of x[m, k] W[n, k] (+ bias[n] and cast unless PARTIAL).

    values: contiguous [nnz] in x's dtype; bitmap [N, words] int32; offsets [N, ceil(K/128)] int32 (stride_f*).
    Program (pid, s): pid picks the [BLOCK_M, BLOCK_N] output tile in grouped order, s the split of K: ``iters``
    steps of BLOCK_K from s * iters * BLOCK_K. EVEN_K: every step of every split lies inside K, and no load needs
    a K mask. Otherwise columns past K load x = 0 and no weight (their bits are cleared, so even a damaged padding
    bit loads nothing): zero products, never a NaN; whole steps past K (the last split's excess) do nothing.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rm64 = rm.to(tl.int64)  # row * stride overflows int32 on long prompts and wide layers
    rn64 = rn.to(tl.int64)
    kw = tl.arange(0, BLOCK_K // 32)
    kx = tl.arange(0, BLOCK_K)
    b_rows = bitmap_ptr + rn64[:, None] * stride_bn
    f_rows = offsets_ptr + rn64 * stride_fn
    x_rows = x_ptr + rm64[:, None] * stride_xm

    k_lo = split * iters * BLOCK_K
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for i in range(0, iters):  # the same trip count for every split (the last one's excess is masked off)
        k0 = k_lo + i * BLOCK_K
        cw = k0 // 32 + kw
        cx = k0 + kx
        if EVEN_K:
            wds = tl.load(b_rows + cw[None, :] * stride_bw, mask=n_ok[:, None], other=0)
            start = tl.load(f_rows + (k0 // 128) * stride_ft, mask=n_ok, other=0)
            x = tl.load(x_rows + cx[None, :] * stride_xk, mask=m_ok[:, None], other=0.0)
        else:
            k_ok = cx < K
            wds = tl.load(b_rows + cw[None, :] * stride_bw, mask=n_ok[:, None] & (cw < words)[None, :], other=0)
            # (k0 + 0 * rn < K: a vector compare; the interpreter rejects n_ok & (a scalar bool) as a mask)
            start = tl.load(f_rows + (k0 // 128) * stride_ft, mask=n_ok & (k0 + 0 * rn < K), other=0)
            x = tl.load(x_rows + cx[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        tile = _expand_bitmap(values_ptr, wds, start, K - k0, not EVEN_K, BLOCK_N, BLOCK_K)
        acc = dot_swap_ab(tile, x, acc, DOT_FP32, INPUT_PRECISION)

    store_swapped_tile(acc, out_ptr, bias_ptr, split, rm, rn, m_ok, n_ok, stride_os, stride_om, stride_on,
                       PARTIAL, HAS_BIAS)


def _num_sms(device: torch.device) -> int:
    return num_sms(device, INTERPRETER_SMS)  # read at call time: tests raise INTERPRETER_SMS to force split-K


def _config(m: int, n: int, k: int, dtype: torch.dtype, sms: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, splits) for x [m, k] of ``dtype`` and W [n, k]."""
    decode = m <= DECODE_MAX_M
    if dtype == torch.float32:
        tiles = FP32_DECODE_TILES if decode else FP32_PREFILL_TILES
    elif decode:
        tiles = DECODE_TILES
    elif m <= 64:
        tiles = PREFILL_TILES_64
    else:
        tiles = PREFILL_TILES_128
    block_m, block_n, block_k, warps, stages = tiles
    programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    wanted = (DECODE_PROGRAMS_PER_SM if decode else PREFILL_PROGRAMS_PER_SM) * sms
    splits = split_count(programs, triton.cdiv(k, block_k), wanted, sms)
    return block_m, block_n, block_k, warps, stages, splits


def bitmap_linear(x: torch.Tensor, values: torch.Tensor, bitmap: torch.Tensor, offsets: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias with W [N, K] the bitmap-compressed weight (values [nnz], bitmap [N, ceil(K/32)] int32,
    offsets [N, ceil(K/128)] int32; K = x.shape[-1]).

    x [..., K] fp16/bf16/fp32, any strides; values in x's dtype (another float dtype is rounded to x's first, as
    the reference does; a strided values tensor is copied contiguous); bitmap and offsets any strides; bias [N] or
    None. y [..., N] in x's dtype, accumulated in fp32 (fp32 x: exact fp32 products, no TF32). Shapes are checked
    by ``sparsekern.ops.bitmap_linear``; the contents (offsets consistent with the bitmap, nnz matching) are not.
    """
    k = x.shape[-1]
    n = bitmap.shape[0]
    lead = x.shape[:-1]
    m = math.prod(lead)
    x2 = x.reshape(m, k)  # a view whenever the leading dims allow it; any strides are passed as they are
    y = new_output((m, n), x.dtype, x.device)
    if m == 0 or n == 0:
        return y.reshape(*lead, n)
    if k == 0:
        y.copy_(torch.zeros((), dtype=x.dtype, device=x.device) if bias is None else bias.to(x.dtype).expand(m, n))
        return y.reshape(*lead, n)

    values = values.to(x.dtype).contiguous()
    if values.numel() == 0:
        values = values.new_zeros(1)  # nothing kept: every bit is 0 and nothing is loaded, but pass a real pointer
    block_m, block_n, block_k, warps, stages, splits = _config(m, n, k, x.dtype, _num_sms(x.device))
    assert block_k % TILE == 0
    iters = triton.cdiv(triton.cdiv(k, block_k), splits)  # per split; the last split may run past K, masked
    has_bias = bias is not None
    if has_bias:
        bias = bias.contiguous()  # the kernels index it as bias[n]
    # Every element of the workspace is written: each split stores its whole tile.
    out = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else y.unsqueeze(0)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n), splits)
    _bitmap_gemm_kernel[grid](
        x2, values, bitmap, offsets, bias if has_bias else values, out,
        m, n, k, bitmap.shape[1],
        x2.stride(0), x2.stride(1), bitmap.stride(0), bitmap.stride(1), offsets.stride(0), offsets.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        iters,
        HAS_BIAS=has_bias, PARTIAL=splits > 1, EVEN_K=k == block_k * iters * splits,
        DOT_FP32=_INTERPRETING and x.dtype == torch.bfloat16,
        INPUT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # tf32: the default, unused by 16-bit
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=GROUP_M,
        num_warps=warps, num_stages=stages,
    )
    if splits > 1:
        splitk_reduce(out, bias, y)
    return y.reshape(*lead, n)
