"""2:4 sparse linear layer from the compressed weight: ``sparse24_linear`` (reference ``reference.sparse24``).

    y[m, n] = sum_k x[m, k] * W[n, k] + bias[n],   W = decompress_24(values, meta)   (fp32 accumulation)

Triton has no sparse tensor-core instruction (``mma.sp``), so the win is in bytes, not in FLOPs: the kernel reads
the compressed weight (values [N, K/2] plus meta [N, ceil(K/32)] int32: K + K/8 bytes per fp16 row, 56% of the
dense row's 2K) and expands every [BLOCK_N, BLOCK_K] weight tile to dense on chip, in registers, right before
``tl.dot``. For 16-bit weights the expansion works on whole groups as integers (``_expand_24_pairs``):

- the values tile is loaded as int32 [BLOCK_N, BLOCK_K/4], one int32 per group of 4 holding its kept pair
  v0 | v1 << 16 (values[n, 2g] is the low half: little-endian); 16-byte vector loads along each row;
- the meta tile [BLOCK_N, BLOCK_K/32] (one int32 per 8 groups) is shifted into the nibble of every group;
- a group's 4 dense entries are the 64-bit integer (v0 << 16 idx0) | (v1 << 16 idx1), cut into its four 16-bit
  quarters and bitcast to fp16/bf16 (join + reshape: [BLOCK_N, BLOCK_K/4, 2, 2] -> [BLOCK_N, BLOCK_K]).

No compare or select: ~20 SASS instructions per group all told (shift amounts, two 64-bit shifts, two ORs, the
packing into 32-bit registers). Per decode iteration and warp on a [64, 256] tile, where(pos == idx0, v0,
where(pos == idx1, v1, 0)) over [BLOCK_N, BLOCK_K/4, 4] compiled to 1684 instructions (the compiler spread a
group's 4 positions over 4 lanes and redid the nibble work in each); per-position selects joined along K
(``_expand_24``, kept for fp32 values), 904; this form, 831, and 279 instead of 356 for the 128 x 128 prefill
tile.

The weight tile is the dot's first operand: acc[BLOCK_N, BLOCK_M] = W_tile @ x_tile^T ("swap AB"). Output
features ride the MMA's large M dimension (64 rows per warpgroup: Hopper's wgmma) and tokens its N dimension,
which may be as small as 16, so a decode step wastes no tensor-core rows on padding tokens, and wgmma takes the
expanded tile from registers (Triton moves it into the dot-operand layout through shared memory). The epilogue
transposes the accumulator tile once per program on its way to y [M, N].

Two configurations of the same kernel, chosen from M (rows of x after flattening its leading dims); numbers are
for an H100 (132 SMs, ~3.35 TB/s) from SASS of the compiled kernels (ptxas, sm_90a), not yet timed on one:

- decode (M <= 16): memory-bound on the weight. BLOCK_M = 16 (the smallest tl.dot; rows past M are masked
  off, so they cost no memory traffic), BLOCK_N = 64, BLOCK_K = 128: 9 KiB of compressed weight per
  iteration, 4 cp.async stages, 84 registers, 52 KiB of shared memory: 4 programs fit on an SM. ~470
  instructions per iteration and warp, so 2 programs per SM issue the expansion for ~18 KiB per ~940 cycles,
  above the ~14 B/cycle per SM that HBM delivers. A tl.dot, not a broadcast-multiply-reduce: at M = 16 the
  reduce would add 16 FMAs per weight element on the CUDA cores that the expansion already keeps half busy;
  the tensor cores do the multiply for nothing. When N / BLOCK_N programs are fewer than the SMs (N = 4096: 64
  programs) K is split as well, for about 2 programs per SM (N = K = 4096: 4 splits).
- prefill (M > 16): a tiled GEMM with grouped program order (GROUP_M tiles of M per band of N, so that a band
  of compressed weight stays in L2 while the band's tiles reuse it). BLOCK_K = 64, BLOCK_N = 128 and BLOCK_M =
  64 (M <= 64), else 256 when 256-row tiles still give every SM a program (and K % 16 == 0: unaligned rows
  load element-wise and spill), else 128. The 256 x 128 tile issues ~295 instructions per iteration and warp
  (8 warps: ~590 cycles) against ~980 cycles of wgmma for its 2M MACs; 128 x 128, ~280 (~560 cycles) against
  ~490, about even. Split-K only when the tiles are fewer than the SMs.

Split-K is deterministic: program (tile, s) writes its fp32 partial sum over its K range to a workspace
[S, M, N]; ``_gemm_common._splitk_reduce_kernel`` (shared with ``bitmap_gemm``) adds the S partials in order, adds
the bias and casts. fp32 atomics would also need a zeroed workspace and a final cast (as many launches) and make y
depend on the order in which programs finish. The workspace is S * M * N * 4 bytes: 64 KiB for a decode step with
N = K = 4096 (S = 4), against 18 MiB of weight read; it stays in L2.

Channel permutation (``sparsekern.permute``): a weight made 2:4 in permuted input order, W[:, perm], is stored
compressed in that order, and y = x[..., perm] @ W[:, perm]^T. With ``perm`` the kernel loads each step's
BLOCK_K indices (int32 or int64; 4 or 8 bytes per column against ~BLOCK_N bytes of compressed weight, and the
same few KiB for every program: L2-resident) and gathers x's columns through them, so no pass writes a permuted
copy of x. The gather costs x's vector loads (element-wise instead of 16-byte): nothing much at decode, where x
is a few KiB; not yet measured for prefill tiles, where every program gathers its [BLOCK_M, BLOCK_K] x tile.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import INTERPRETING
from ._gemm_common import dot_swap_ab, grouped_tile, num_sms, split_count, splitk_reduce, store_swapped_tile
from ._outputs import new_output

# The interpreter (TRITON_INTERPRET=1, triton 3.9 on CPU) computes bf16 tl.dot wrongly (fp16 is right); bf16
# tiles are upcast to fp32 there (exact: every bf16 is an fp32, and products are accumulated in fp32 anyway).
_INTERPRETING = INTERPRETING

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Registers per thread from ptxas -arch=sm_90a, fp16 and bf16
# alike, for a launch with N = K = 4096 (triton 3.9 / triton 3.6 with its own ptxas), no spills; partial (split-K)
# variants and K % 16 != 0 (element-wise loads) noted where they differ.
DECODE_TILES = (16, 64, 128, 4, 4)  # 84 / 84 (split-K 112 / 92; K % 16 != 0: 124 / 127)
PREFILL_TILES_64 = (64, 128, 64, 4, 4)  # M <= 64: 172 / 156 (K % 16 != 0: 255 / 255, no spill)
PREFILL_TILES_128 = (128, 128, 64, 8, 3)  # 134 / 130 (K % 16 != 0: 254 / 235, no spill)
PREFILL_TILES_256 = (256, 128, 64, 8, 3)  # 226 / 217, 122 KiB shared memory (K % 16 != 0 would spill ~550 B)
# fp32 x (exact fp32 products on the FMA units, no tensor cores): smaller tiles keep fp32 operands within shared
# memory and registers. Decode 80 / 80; prefill 162 / 128 (K % 16 != 0: 212 / 168 with a 24-byte spill).
FP32_DECODE_TILES = (16, 64, 64, 4, 3)
FP32_PREFILL_TILES = (64, 64, 32, 4, 3)
DECODE_MAX_M = 16
GROUP_M = 8
# Programs per SM wanted before K is split. Decode: 2 x 4 stages x 9 KiB in flight per SM is several times what
# HBM latency x bandwidth asks for (~25 KiB per SM). Prefill tiles carry more work each: one per SM.
DECODE_PROGRAMS_PER_SM = 2
PREFILL_PROGRAMS_PER_SM = 1
# The interpreter has no SMs; this stands in for the count (tests raise it to force split-K on small shapes).
INTERPRETER_SMS = 4


@triton.jit
def _nibbles(words, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
    """[BLOCK_N, GROUPS] nibbles idx0 | idx1 << 2 from meta words [BLOCK_N, GROUPS / 8] (group g at bits 4 (g % 8))."""
    shifts = 4 * tl.arange(0, 8)
    return tl.reshape((words[:, :, None] >> shifts[None, None, :]) & 0xF, [BLOCK_N, GROUPS])


@triton.jit
def _expand_24_pairs(pairs, words, DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dense [BLOCK_N, BLOCK_K] tile of the 16-bit DTYPE from pairs [BLOCK_N, BLOCK_K/4] int32 (v0 | v1 << 16,
    a group's kept values read as one int32) and meta words [BLOCK_N, BLOCK_K/32]."""
    nib = _nibbles(words, BLOCK_N, BLOCK_K // 4)
    v0 = (pairs & 0xFFFF).to(tl.int64)
    v1 = ((pairs >> 16) & 0xFFFF).to(tl.int64)
    # 16 * idx <= 48 < 64: every shift is defined. idx0 < idx1, so the two values never overlap.
    group = (v0 << ((nib & 3) * 16).to(tl.int64)) | (v1 << ((nib >> 2) * 16).to(tl.int64))
    q0 = group.to(tl.int16)  # truncations: the four 16-bit quarters, dense positions 0..3
    q1 = (group >> 16).to(tl.int16)
    q2 = (group >> 32).to(tl.int16)
    q3 = (group >> 48).to(tl.int16)
    # join(join(q0, q2), join(q1, q3))[n, g, a, b] = q_{2a + b}: row-major flattening restores positions 0..3.
    dense = tl.join(tl.join(q0, q2), tl.join(q1, q3))
    return tl.reshape(dense, [BLOCK_N, BLOCK_K]).to(DTYPE, bitcast=True)


@triton.jit
def _expand_24(vals, words, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dense [BLOCK_N, BLOCK_K] tile from values [BLOCK_N, BLOCK_K/2] (any dtype) and meta [BLOCK_N, BLOCK_K/32]."""
    v0, v1 = tl.split(tl.reshape(vals, [BLOCK_N, BLOCK_K // 4, 2]))
    nib = _nibbles(words, BLOCK_N, BLOCK_K // 4)
    idx0 = nib & 3  # 0, 1 or 2
    idx1 = nib >> 2  # 1, 2 or 3 (idx0 < idx1)
    zero = tl.zeros_like(v0)
    d0 = tl.where(idx0 == 0, v0, zero)
    d1 = tl.where(idx0 == 1, v0, tl.where(idx1 == 1, v1, zero))
    d2 = tl.where(idx0 == 2, v0, tl.where(idx1 == 2, v1, zero))
    d3 = tl.where(idx1 == 3, v1, zero)
    dense = tl.join(tl.join(d0, d2), tl.join(d1, d3))  # [n, g, a, b] = d_{2a + b}
    return tl.reshape(dense, [BLOCK_N, BLOCK_K])


@triton.jit
def _sparse24_gemm_kernel(
    x_ptr, w_ptr, meta_ptr, bias_ptr, perm_ptr, out_ptr,
    M, N, K, w_cols, words,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_mn, stride_mw,
    stride_os, stride_om, stride_on,
    iters,
    PAIRS: tl.constexpr, W_PER_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PERM: tl.constexpr,
    PARTIAL: tl.constexpr, EVEN_K: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[(s,) m, n] = sum over this program's K range of x[m, p(k)] W[n, k] (+ bias[n] and cast unless PARTIAL),
    p(k) = perm[k] when HAS_PERM (perm_ptr: int32 or int64 [K], W stored in permuted input order), else k.

    w is the values tensor: int32 [N, K/4] pairs when PAIRS (16-bit values), else [N, K/2] in x's dtype;
    W_PER_GROUP (1 or 2) is its columns per group of 4. Program (pid, s): pid picks the [BLOCK_M, BLOCK_N] output
    tile in grouped order, s the split of K: ``iters`` steps of BLOCK_K from s * iters * BLOCK_K. BLOCK_K is a
    multiple of 32, so a tile's meta words are whole: dense column k0 starts group k0 / 4 and meta word k0 / 32.
    EVEN_K: every step of every split lies inside K, and no load needs a K mask. Otherwise columns past K (a
    ragged tail, or whole steps of the last split) load as 0: zero x times a zero weight, never a NaN. With a
    perm, each step loads its BLOCK_K indices and gathers x's columns through them (no separate gather pass).
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
    kv = tl.arange(0, BLOCK_K // 4 * W_PER_GROUP)
    kw = tl.arange(0, BLOCK_K // 32)
    kx = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rn64[:, None] * stride_wn
    m_rows = meta_ptr + rn64[:, None] * stride_mn
    x_rows = x_ptr + rm64[:, None] * stride_xm

    k_lo = split * iters * BLOCK_K
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for i in range(0, iters):  # the same trip count for every split (the last one's excess is masked off)
        k0 = k_lo + i * BLOCK_K
        cv = k0 // 4 * W_PER_GROUP + kv
        cw = k0 // 32 + kw
        cx = k0 + kx
        if EVEN_K:
            vals = tl.load(w_rows + cv[None, :] * stride_wk, mask=n_ok[:, None], other=0)
            meta = tl.load(m_rows + cw[None, :] * stride_mw, mask=n_ok[:, None], other=0)
            if HAS_PERM:
                cx = tl.load(perm_ptr + cx)  # the x column of each weight column of the step
            x = tl.load(x_rows + cx[None, :] * stride_xk, mask=m_ok[:, None], other=0.0)
        else:
            vals = tl.load(w_rows + cv[None, :] * stride_wk, mask=n_ok[:, None] & (cv < w_cols)[None, :], other=0)
            meta = tl.load(m_rows + cw[None, :] * stride_mw, mask=n_ok[:, None] & (cw < words)[None, :], other=0)
            k_ok = cx < K
            if HAS_PERM:
                cx = tl.load(perm_ptr + cx, mask=k_ok, other=0)
            x = tl.load(x_rows + cx[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if PAIRS:
            tile = _expand_24_pairs(vals, meta, x_ptr.dtype.element_ty, BLOCK_N, BLOCK_K)
        else:
            tile = _expand_24(vals, meta, BLOCK_N, BLOCK_K)
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
    elif k % 16 == 0 and triton.cdiv(m, 256) * triton.cdiv(n, PREFILL_TILES_256[1]) >= sms:
        tiles = PREFILL_TILES_256
    else:
        tiles = PREFILL_TILES_128
    block_m, block_n, block_k, warps, stages = tiles
    programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    wanted = (DECODE_PROGRAMS_PER_SM if decode else PREFILL_PROGRAMS_PER_SM) * sms
    splits = split_count(programs, triton.cdiv(k, block_k), wanted, sms)
    return block_m, block_n, block_k, warps, stages, splits


def _as_pairs(values: torch.Tensor) -> torch.Tensor:
    """16-bit values [N, K/2] viewed as int32 [N, K/4]: one int32 per group, v0 in its low half."""
    try:
        return values.view(torch.int32)
    except RuntimeError:  # last dim not contiguous, or an odd storage offset
        return values.contiguous().view(torch.int32)


def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                    bias: torch.Tensor | None = None, perm: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias with W [N, K] the 2:4 weight compressed as (values [N, K/2], meta [N, ceil(K/32)] int32).

    x [..., K] fp16/bf16/fp32, any strides; values in x's dtype (another float dtype is rounded to x's first, as
    the reference does); bias [N] or None. y [..., N] in x's dtype, accumulated in fp32 (fp32 x: exact fp32
    products, no TF32). perm [K] int32/int64 or None: W is in permuted input order and y = x[..., perm] @ W^T +
    bias, gathered by the kernel's loads of x (perm must hold indices in [0, K): not checked). Shapes are checked
    by ``sparsekern.ops.sparse24_linear``.
    """
    k = x.shape[-1]
    n = values.shape[0]
    lead = x.shape[:-1]
    m = math.prod(lead)
    x2 = x.reshape(m, k)  # a view whenever the leading dims allow it; any strides are passed as they are
    y = new_output((m, n), x.dtype, x.device)
    if m == 0 or n == 0:
        return y.reshape(*lead, n)
    if k == 0:
        y.copy_(torch.zeros((), dtype=x.dtype, device=x.device) if bias is None else bias.to(x.dtype).expand(m, n))
        return y.reshape(*lead, n)

    if values.dtype != x.dtype:
        values = values.to(x.dtype)
    pairs = x.dtype != torch.float32
    w = _as_pairs(values) if pairs else values
    block_m, block_n, block_k, warps, stages, splits = _config(m, n, k, x.dtype, _num_sms(x.device))
    iters = triton.cdiv(triton.cdiv(k, block_k), splits)  # per split; the last split may run past K, masked
    has_bias = bias is not None
    if has_bias:
        bias = bias.contiguous()  # the kernels index it as bias[n]
    has_perm = perm is not None
    if has_perm:
        perm = perm.contiguous()  # indexed as perm[k]
    # Every element of the workspace is written: each split stores its whole tile.
    out = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else y.unsqueeze(0)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n), splits)
    _sparse24_gemm_kernel[grid](
        x2, w, meta, bias if has_bias else w, perm if has_perm else meta, out,
        m, n, k, w.shape[1], meta.shape[1],
        x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), meta.stride(0), meta.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        iters,
        PAIRS=pairs, W_PER_GROUP=1 if pairs else 2, HAS_BIAS=has_bias, HAS_PERM=has_perm, PARTIAL=splits > 1,
        EVEN_K=k == block_k * iters * splits,
        DOT_FP32=_INTERPRETING and x.dtype == torch.bfloat16,
        INPUT_PRECISION="tf32" if pairs else "ieee",  # tf32: the default, unused by fp16/bf16 operands
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=GROUP_M,
        num_warps=warps, num_stages=stages,
    )
    if splits > 1:
        splitk_reduce(out, bias, y)
    return y.reshape(*lead, n)
