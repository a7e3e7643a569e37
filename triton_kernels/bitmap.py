"""Bitmap compression and decompression: ``compress_bitmap`` and ``decompress_bitmap`` (format and reference in
``sparsekern.reference.bitmap``: values [nnz] + bitmap [N, ceil(K/32)] int32 + offsets [N, ceil(K/128)] int32).

Every program owns a tile of BLOCK_N rows x BLOCK_T column tiles of 128 (the format's offsets tiles):

- ``_bitmap_count_kernel`` (compress, pass 1) reads W's tile, packs a bit per entry (kept: bits not all zero)
  into the bitmap words and writes the kept count of every (row, 128-column tile) to ``counts`` [N, T] int32.
- The launcher turns the counts into offsets with one exclusive ``torch.cumsum`` over the row-major [N * T]
  counts (int64, then checked < 2**31 and stored as int32); its last value is nnz, read by the host (one sync:
  the size of ``values`` depends on the data).
- ``_bitmap_scatter_kernel`` (pass 2) reads W's tile again and stores each kept entry at offsets[n, t] + the
  exclusive prefix count (``tl.cumsum``) of kept entries before it in its 128-column tile.
- ``_bitmap_decompress_kernel`` expands the words into bits, finds each kept entry's index the same way and
  gathers it from values (a masked load; +0.0 where not kept).

All three work on integer views of the same element size (W, values, the output), so they move bits: -0.0, NaN
payloads, infinities and subnormals survive, and "kept" is the integer test bits != 0 for every float dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsekern.reference.bitmap import TILE, WORD, check_nnz, int_view

from ._outputs import new_output

# (BLOCK_N, BLOCK_T) per program: rows x 128-column tiles. GPU: 16 rows x 256 columns = 4096 entries over 4 warps.
# Not tuned on a GPU (compression is offline, once per weight; it reads W twice and writes ~W's size). The
# interpreter pays per operation and per program, so it runs big tiles; tests shrink them to cover several
# programs and the masked tails.
GPU_TILES = (16, 2)
GPU_WARPS = 4
INTERPRETER_TILES = (64, 4)


@triton.jit
def _bitmap_count_kernel(
    w_ptr, bitmap_ptr, counts_ptr, rows, cols, words, tiles, stride_wr, stride_wc,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """bitmap[n, w] = sum_j (W[n, 32w + j] kept) << j and counts[n, t] = #kept in W[n, 128t : 128t + 128], with
    kept = (the integer view of W) != 0. Columns past K are not kept, so the padding bits are 0. The words sum
    distinct powers of two: their bitwise or, wrapping into bit 31 like the reference's signed int32."""
    row0 = tl.program_id(0) * BLOCK_N
    t0 = tl.program_id(1) * BLOCK_T
    w_ptr += row0.to(tl.int64) * stride_wr + (t0 * 128).to(tl.int64) * stride_wc  # 64-bit scalar bases
    r = tl.arange(0, BLOCK_N)[:, None, None]
    t = tl.arange(0, BLOCK_T)[None, :, None]
    c = tl.arange(0, 128)[None, None, :]
    col = t * 128 + c  # [1, BLOCK_T, 128], relative to column 128 t0
    live = (row0 + r < rows) & (t0 * 128 + col < cols)
    w = tl.load(w_ptr + r * stride_wr + col * stride_wc, mask=live, other=0)
    kept = (w != 0).to(tl.int32)  # [BLOCK_N, BLOCK_T, 128]

    lane = tl.arange(0, 32)[None, None, :]
    packed = tl.sum(tl.reshape(kept, [BLOCK_N, BLOCK_T * 4, 32]) << lane, axis=2)  # [BLOCK_N, BLOCK_T * 4]
    rw = tl.arange(0, BLOCK_N)[:, None]
    word = tl.arange(0, BLOCK_T * 4)[None, :]
    tl.store(bitmap_ptr + (row0 + rw).to(tl.int64) * words + t0 * 4 + word, packed,
             mask=(row0 + rw < rows) & (t0 * 4 + word < words))
    tile = tl.arange(0, BLOCK_T)[None, :]
    tl.store(counts_ptr + (row0 + rw).to(tl.int64) * tiles + t0 + tile, tl.sum(kept, axis=2),
             mask=(row0 + rw < rows) & (t0 + tile < tiles))


@triton.jit
def _bitmap_scatter_kernel(
    w_ptr, offsets_ptr, values_ptr, rows, cols, tiles, stride_wr, stride_wc,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """values[offsets[n, t] + p] = W[n, 128t + c] for every kept entry, p = #kept in W[n, 128t : 128t + c]: the
    row-major order of ``reference.bitmap.compress_bitmap``'s boolean indexing."""
    row0 = tl.program_id(0) * BLOCK_N
    t0 = tl.program_id(1) * BLOCK_T
    w_ptr += row0.to(tl.int64) * stride_wr + (t0 * 128).to(tl.int64) * stride_wc
    r = tl.arange(0, BLOCK_N)[:, None, None]
    t = tl.arange(0, BLOCK_T)[None, :, None]
    c = tl.arange(0, 128)[None, None, :]
    col = t * 128 + c
    row_ok = row0 + r < rows
    live = row_ok & (t0 * 128 + col < cols)
    w = tl.load(w_ptr + r * stride_wr + col * stride_wc, mask=live, other=0)
    kept = (w != 0).to(tl.int32)
    start = tl.load(offsets_ptr + (row0 + r).to(tl.int64) * tiles + t0 + t, mask=row_ok & (t0 + t < tiles), other=0)
    pos = start + tl.cumsum(kept, axis=2) - kept  # int32: nnz < 2**31 (checked by the launcher)
    tl.store(values_ptr + pos, w, mask=kept != 0)


@triton.jit
def _bitmap_decompress_kernel(
    values_ptr, bitmap_ptr, offsets_ptr, out_ptr, rows, cols,
    stride_br, stride_bw, stride_or, stride_ot,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """W[n, 128t + c] = values[offsets[n, t] + p] if bit c % 32 of bitmap[n, 4t + c / 32] is set, else 0, with p
    the set bits before c in the tile: ``reference.bitmap.decompress_bitmap``. Bits past K are ignored (not
    loaded), so a damaged padding bit cannot send a load out of bounds."""
    row0 = tl.program_id(0) * BLOCK_N
    t0 = tl.program_id(1) * BLOCK_T
    r = tl.arange(0, BLOCK_N)[:, None]
    word = tl.arange(0, BLOCK_T * 4)[None, :]
    row_ok = row0 + r < rows
    r64 = (row0 + r).to(tl.int64)
    words = tl.load(bitmap_ptr + r64 * stride_br + (t0 * 4 + word) * stride_bw,
                    mask=row_ok & ((t0 * 4 + word) * 32 < cols), other=0)  # [BLOCK_N, BLOCK_T * 4]
    lane = tl.arange(0, 32)[None, None, :]
    bits = tl.reshape((words[:, :, None] >> lane) & 1, [BLOCK_N, BLOCK_T, 128])  # sign bits masked off by & 1

    r3 = r[:, :, None]
    t = tl.arange(0, BLOCK_T)[None, :, None]
    col = t0 * 128 + t * 128 + tl.arange(0, 128)[None, None, :]
    live = (row0 + r3 < rows) & (col < cols)
    bits = tl.where(live, bits, 0)
    start = tl.load(offsets_ptr + (row0 + r3).to(tl.int64) * stride_or + (t0 + t) * stride_ot,
                    mask=(row0 + r3 < rows) & (t0 * 128 + t * 128 < cols), other=0)
    pos = start + tl.cumsum(bits, axis=2) - bits
    dense = tl.load(values_ptr + pos, mask=bits != 0, other=0)
    tl.store(out_ptr + (row0 + r3).to(tl.int64) * cols + col, dense, mask=live)


def _tiles(rows: int, tiles: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_T): the module's tiles, shrunk to the matrix."""
    block_n, block_t = GPU_TILES if device.type == "cuda" else INTERPRETER_TILES
    return min(block_n, triton.next_power_of_2(rows)), min(block_t, triton.next_power_of_2(tiles))


def compress_bitmap(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values [nnz] in weight's dtype, bitmap [N, ceil(K/32)] int32, offsets [N, ceil(K/128)] int32) of a weight
    [N, K] of any float dtype and strides, bit-identical to ``reference.compress_bitmap``. Reads nnz back to the
    host (the size of values); raises ValueError when nnz >= 2**31."""
    rows, cols = weight.shape
    words, tiles = triton.cdiv(cols, WORD), triton.cdiv(cols, TILE)
    bitmap = new_output((rows, words), torch.int32, weight.device)
    if rows == 0 or cols == 0:
        return (new_output((0,), weight.dtype, weight.device), bitmap,
                torch.zeros((rows, tiles), dtype=torch.int32, device=weight.device))
    bits = int_view(weight)
    counts = new_output((rows, tiles), torch.int32, weight.device)
    block_n, block_t = _tiles(rows, tiles, weight.device)
    grid = (triton.cdiv(rows, block_n), triton.cdiv(tiles, block_t))
    _bitmap_count_kernel[grid](
        bits, bitmap, counts, rows, cols, words, tiles, bits.stride(0), bits.stride(1),
        BLOCK_N=block_n, BLOCK_T=block_t, num_warps=GPU_WARPS,
    )
    flat = counts.flatten().to(torch.int64)
    ends = flat.cumsum(0)
    nnz = int(ends[-1])
    check_nnz(nnz)
    offsets = (ends - flat).to(torch.int32).reshape(rows, tiles)
    values = new_output((nnz,), weight.dtype, weight.device)
    if nnz:
        _bitmap_scatter_kernel[grid](
            bits, offsets, int_view(values), rows, cols, tiles, bits.stride(0), bits.stride(1),
            BLOCK_N=block_n, BLOCK_T=block_t, num_warps=GPU_WARPS,
        )
    return values, bitmap, offsets


def decompress_bitmap(values: torch.Tensor, bitmap: torch.Tensor, offsets: torch.Tensor,
                      in_features: int) -> torch.Tensor:
    """The dense weight [N, in_features] (values' dtype, contiguous) of a bitmap-compressed weight: the kept
    entries bit for bit, +0.0 elsewhere. bitmap and offsets may have any strides; values is read contiguous."""
    rows = bitmap.shape[0]
    out = new_output((rows, in_features), values.dtype, values.device)
    if rows == 0 or in_features == 0:
        return out
    if values.numel() == 0:
        return out.zero_()  # nothing kept; and no pointer to gather from
    src = int_view(values.contiguous())
    block_n, block_t = _tiles(rows, triton.cdiv(in_features, TILE), values.device)
    grid = (triton.cdiv(rows, block_n), triton.cdiv(triton.cdiv(in_features, TILE), block_t))
    _bitmap_decompress_kernel[grid](
        src, bitmap, offsets, int_view(out), rows, in_features,
        bitmap.stride(0), bitmap.stride(1), offsets.stride(0), offsets.stride(1),
        BLOCK_N=block_n, BLOCK_T=block_t, num_warps=GPU_WARPS,
    )
    return out
