"""2:4 compression and decompression: ``compress_24`` and ``decompress_24`` (format and reference in
``sparsekern.reference.sparse24``: values [N, K/2] + meta [N, ceil(K/32)] int32, 8 nibbles idx0 | idx1 << 2 a word).

One launch each; every program owns a tile of BLOCK_N rows x BLOCK_G groups of 4 columns:

- ``_compress_24_kernel`` reads the [BLOCK_N, BLOCK_G, 4] tile of W, picks each group's two kept positions as the
  reference does, writes the kept values and packs the positions of 8 groups into each meta word.
- ``_decompress_24_kernel`` unpacks the positions and writes the [BLOCK_N, BLOCK_G, 4] tile of W: every element
  is a masked load of its kept value, or 0.

Both only move bits (selects, no arithmetic on values), so they are exact: -0.0 and NaN payloads survive.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsekern.reference.sparse24 import GROUPS_PER_WORD

from ._outputs import new_output

# (BLOCK_N, BLOCK_G) per program. On a GPU, 16 rows x 64 groups = 4096 elements of W over 8 warps (16 a thread).
# ptxas registers (sm_90a, triton 3.9), no spills anywhere:
#   compress    40 for a contiguous weight with 16-byte aligned rows (vector loads); 79-111 for a strided one
#               (a transposed view: scalar loads, a group's 4 members in different threads); 93-102 with nothing
#               known about alignment
#   decompress  40 (64 with nothing known about alignment): a masked scalar gather of values, vector stores
# The same tile on 4 warps needs 56-72 (contiguous) and 150-200 (strided) registers.
# The interpreter pays per operation and per program, not per register, so it runs big tiles; tests shrink them
# to cover several programs and the masked tails.
GPU_TILES = (16, 64)
GPU_WARPS = 8
INTERPRETER_TILES = (64, 256)


@triton.jit
def _compress_24_kernel(
    w_ptr, values_ptr, meta_ptr, rows, groups, words, stride_wr, stride_wc,
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """values[n, 2g + s] = W[n, 4g + idx_s] and meta[n, g // 8] |= (idx0 | idx1 << 2) << 4 (g % 8), where

        key_j = j if W[n, 4g + j] != 0 else j + 4      (nonzeros first, then free positions, each by position)
        {idx0 < idx1} = the positions (key & 3) of the two smallest keys of the group

    which is ``reference.sparse24.compress_24`` (argsort of the same keys, first two, sorted). Keys are distinct,
    so the second smallest is the smallest once the first is knocked out. BLOCK_G is a multiple of 8: a program
    writes whole meta words; groups past the row's end (the last word's padding) get nibble 0.
    """
    # 64-bit scalar bases for the program's first row and group, 32-bit offsets inside the tile (64-bit offsets
    # per element cost registers: 2 an element).
    row0 = tl.program_id(0) * BLOCK_N
    g0 = tl.program_id(1) * BLOCK_G
    w_ptr += row0.to(tl.int64) * stride_wr + (4 * g0).to(tl.int64) * stride_wc
    values_ptr += row0.to(tl.int64) * (2 * groups) + 2 * g0
    meta_ptr += row0.to(tl.int64) * words + g0 // 8
    r = tl.arange(0, BLOCK_N)[:, None]
    g = tl.arange(0, BLOCK_G)[None, :]
    j = tl.arange(0, 4)
    real = g0 + g < groups
    live = (row0 + r < rows) & real  # [BLOCK_N, BLOCK_G]
    col = 4 * g[:, :, None] + j[None, None, :]
    w = tl.load(w_ptr + r[:, :, None] * stride_wr + col * stride_wc, mask=live[:, :, None], other=0.0)

    # Zero tested in fp32 (exact for every dtype; -0.0 counts as zero, as in torch): the interpreter compares bf16
    # by its bits, where -0.0 != 0.
    key = tl.where(w.to(tl.float32) != 0, j[None, None, :], j[None, None, :] + 4)
    first = tl.min(key, axis=2)
    second = tl.min(tl.where(key == first[:, :, None], 8, key), axis=2)
    idx0 = tl.minimum(first & 3, second & 3)  # in {0, 1, 2}
    idx1 = tl.maximum(first & 3, second & 3)  # in {1, 2, 3}

    # The four members as [BLOCK_N, BLOCK_G] tensors (position 2a + b is [a, b] of the reshaped tile), so the
    # kept values are chosen by selects, bit for bit, instead of a one-hot sum (which turns -0.0 into +0.0).
    even, odd = tl.split(tl.reshape(w, [BLOCK_N, BLOCK_G, 2, 2]))  # positions {0, 2} and {1, 3}
    w0, w2 = tl.split(even)
    w1, w3 = tl.split(odd)
    v0 = tl.where(idx0 == 0, w0, tl.where(idx0 == 1, w1, w2))
    v1 = tl.where(idx1 == 3, w3, tl.where(idx1 == 2, w2, w1))
    s = tl.arange(0, 2)
    v_ptrs = values_ptr + r[:, :, None] * (2 * groups) + 2 * g[:, :, None] + s[None, None, :]
    tl.store(v_ptrs, tl.join(v0, v1), mask=live[:, :, None])

    # Nibbles of 8 consecutive groups occupy disjoint bits of one word, so their sum is their bitwise or (the
    # int32 sum wraps exactly like the reference's signed reinterpretation of bit 31).
    nibble = tl.where(real, idx0 | (idx1 << 2), 0)
    lane = tl.arange(0, 8)
    packed = tl.sum(tl.reshape(nibble, [BLOCK_N, BLOCK_G // 8, 8]) << (4 * lane[None, None, :]), axis=2)
    word = tl.arange(0, BLOCK_G // 8)[None, :]
    tl.store(meta_ptr + r * words + word, packed, mask=(row0 + r < rows) & (g0 // 8 + word < words))


@triton.jit
def _decompress_24_kernel(
    values_ptr, meta_ptr, out_ptr, rows, groups, stride_vr, stride_vc, stride_mr, stride_mc,
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """W[n, 4g + j] = values[n, 2g + s] if j == idx_s else 0, with idx0 | idx1 << 2 = meta[n, g // 8] >> 4 (g % 8)
    & 0xF: ``reference.sparse24.decompress_24`` (a scatter into zeros). Each element is one load, masked off
    where its position is not kept (other=0), so nothing is computed on the values: an exact round trip."""
    row0 = tl.program_id(0) * BLOCK_N
    g0 = tl.program_id(1) * BLOCK_G
    values_ptr += row0.to(tl.int64) * stride_vr + (2 * g0).to(tl.int64) * stride_vc  # 64-bit scalar bases,
    meta_ptr += row0.to(tl.int64) * stride_mr + (g0 // 8).to(tl.int64) * stride_mc  # 32-bit offsets in the tile
    out_ptr += row0.to(tl.int64) * (4 * groups) + 4 * g0
    r = tl.arange(0, BLOCK_N)[:, None]
    g = tl.arange(0, BLOCK_G)[None, :]
    j = tl.arange(0, 4)[None, None, :]
    live = (row0 + r < rows) & (g0 + g < groups)

    # The 8 groups of a word load the same address: one transaction, served from L1.
    word = tl.load(meta_ptr + r * stride_mr + (g // 8) * stride_mc, mask=live, other=0)
    nibble = (word >> (4 * (g % 8))) & 0xF  # the arithmetic shift's sign bits are masked off
    idx0 = (nibble & 3)[:, :, None]
    idx1 = (nibble >> 2)[:, :, None]

    src = 2 * g[:, :, None] + (j == idx1).to(tl.int32)  # value 2g for idx0, 2g + 1 for idx1
    kept = (j == idx0) | (j == idx1)
    live3 = live[:, :, None]
    dense = tl.load(values_ptr + r[:, :, None] * stride_vr + src * stride_vc, mask=live3 & kept, other=0.0)
    tl.store(out_ptr + r[:, :, None] * (4 * groups) + 4 * g[:, :, None] + j, dense, mask=live3)


def _tiles(rows: int, groups: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_G): the module's tiles, shrunk to the matrix (BLOCK_G stays a multiple of 8)."""
    block_n, block_g = GPU_TILES if device.type == "cuda" else INTERPRETER_TILES
    block_g = min(block_g, max(GROUPS_PER_WORD, triton.next_power_of_2(groups)))
    block_n = min(block_n, triton.next_power_of_2(rows))
    return block_n, block_g


def compress_24(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [N, K/2] in weight's dtype, meta [N, ceil(K/32)] int32) of a 2:4 weight [N, K] (fp32/fp16/bf16,
    any strides), bit-identical to ``reference.compress_24``. The 2:4 pattern is checked by ``ops.compress_24``."""
    rows, cols = weight.shape
    groups = cols // 4
    words = triton.cdiv(groups, GROUPS_PER_WORD)
    values = new_output((rows, 2 * groups), weight.dtype, weight.device)
    meta = new_output((rows, words), torch.int32, weight.device)
    if rows == 0 or groups == 0:
        return values, meta
    block_n, block_g = _tiles(rows, groups, weight.device)
    grid = (triton.cdiv(rows, block_n), triton.cdiv(groups, block_g))
    _compress_24_kernel[grid](
        weight, values, meta, rows, groups, words, weight.stride(0), weight.stride(1),
        BLOCK_N=block_n, BLOCK_G=block_g, num_warps=GPU_WARPS,
    )
    return values, meta


def decompress_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The dense weight [N, 2 * values.shape[1]] (values' dtype, contiguous) of a compressed 2:4 weight; exact,
    zeros where nothing is kept. values and meta may have any strides."""
    rows, half = values.shape
    groups = half // 2
    out = new_output((rows, 2 * half), values.dtype, values.device)
    if rows == 0 or groups == 0:
        return out
    block_n, block_g = _tiles(rows, groups, values.device)
    grid = (triton.cdiv(rows, block_n), triton.cdiv(groups, block_g))
    _decompress_24_kernel[grid](
        values, meta, out, rows, groups, values.stride(0), values.stride(1), meta.stride(0), meta.stride(1),
        BLOCK_N=block_n, BLOCK_G=block_g, num_warps=GPU_WARPS,
    )
    return out
