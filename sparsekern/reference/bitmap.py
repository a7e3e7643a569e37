"""Reference bitmap compressed weights: any unstructured sparsity as the kept values, a bit per weight, and the
start of every 128-column tile of each row in the values; and the linear layer over them.

Format, for a weight W [N, K] of any float dtype. An entry is *kept* iff its bits are not those of +0.0 (compared
as integers: -0.0, NaN payloads, infinities and subnormals are kept, and come back bit for bit):
- ``values`` [nnz], W's dtype: the kept entries in row-major order (row by row, by column within a row).
- ``bitmap`` [N, ceil(K/32)] int32: bit j (LSB = 0) of bitmap[n, w] is set iff W[n, 32w + j] is kept; the bits
  past K in a row's last word are 0. The words hold the 32 bits as signed int32 (bit 31 is the sign).
- ``offsets`` [N, ceil(K/128)] int32: offsets[n, t] is the index in ``values`` of the first kept entry at or after
  column 128t of row n, i.e. the number of kept entries before (n, 128t) in row-major order. nnz < 2**31.

A tile of ``TILE`` = 128 columns of a row is self-contained: its kept entries are values[offsets[n, t] + i] for
i = 0, 1, ... in column order, so the kept entry at column 128t + c sits at offsets[n, t] + (the number of set
bits of the tile before c). A kernel expands any [rows, 128-column] tile without reading anything else.

Bytes per weight column of a row, at sparsity s (fraction not kept), for fp16/bf16: 2(1 - s) of values, 1/8 of
bitmap, 4/128 = 1/32 of offsets: 2(1 - s) + 0.156, 57.8% of the dense 2 bytes at 50% sparsity, 37.8% at 70%
(fp32: 4(1 - s) + 0.156, 53.9% at 50%). The bitmap beats 2:4's 56% from about 52% sparsity, and takes any mask.
"""

from __future__ import annotations

import torch

TILE = 128  # columns per offsets entry
WORD = 32  # columns per bitmap word

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def int_view(t: torch.Tensor) -> torch.Tensor:
    """The same memory as a signed integer tensor of the same element size (so bits are compared and moved)."""
    return t.view(_INT_OF_SIZE[t.element_size()])


def check_nnz(nnz: int) -> None:
    if nnz >= 2**31:
        raise ValueError(f"the weight keeps {nnz} entries; the bitmap format's int32 offsets index at most 2**31 - 1 "
                         "values: split the weight (e.g. by rows) into smaller ones")


def pack_bits(kept: torch.Tensor) -> torch.Tensor:
    """int32 [N, ceil(K/32)] words of a bool [N, K] (bit j of word w: column 32w + j; padding bits 0)."""
    rows, cols = kept.shape
    words = -(-cols // WORD)
    padded = torch.zeros(rows, words * WORD, dtype=torch.int64, device=kept.device)
    padded[:, :cols] = kept
    shifts = torch.arange(WORD, device=kept.device)
    packed = (padded.reshape(rows, words, WORD) << shifts).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # the same 32 bits, signed


def unpack_bits(bitmap: torch.Tensor, cols: int) -> torch.Tensor:
    """bool [N, cols] of the bitmap's words."""
    shifts = torch.arange(WORD, device=bitmap.device)
    bits = (bitmap.to(torch.int64).unsqueeze(-1) >> shifts) & 1  # the sign extension is masked off
    return bits.reshape(bitmap.shape[0], bitmap.shape[1] * WORD)[:, :cols].bool()


def tile_offsets(kept: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(offsets int32 [N, ceil(K/128)], nnz) of a bool [N, K]: kept entries before each (row, 128-column tile)."""
    rows, cols = kept.shape
    tiles = -(-cols // TILE)
    counts = torch.nn.functional.pad(kept.to(torch.int64), (0, tiles * TILE - cols)).reshape(rows, tiles, TILE).sum(-1)
    flat = counts.flatten()
    ends = flat.cumsum(0)
    nnz = int(ends[-1]) if flat.numel() else int(kept.sum())
    check_nnz(nnz)
    return (ends - flat).reshape(rows, tiles).to(torch.int32), nnz


def compress_bitmap(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values [nnz] in weight's dtype, bitmap [N, ceil(K/32)] int32, offsets [N, ceil(K/128)] int32) of a weight
    [N, K] of any float dtype and strides; see the module docstring."""
    kept = int_view(weight) != 0
    offsets, _ = tile_offsets(kept)
    values = int_view(weight)[kept].view(weight.dtype)  # boolean indexing: row-major order, bits copied
    return values, pack_bits(kept), offsets


def decompress_bitmap(values: torch.Tensor, bitmap: torch.Tensor, offsets: torch.Tensor,
                      in_features: int) -> torch.Tensor:
    """The dense weight [N, in_features] in values' dtype: the kept entries bit for bit, +0.0 elsewhere. The
    positions come from the bitmap alone (offsets are redundant with it: a kernel's shortcut)."""
    kept = unpack_bits(bitmap, in_features)
    dense = torch.zeros(kept.shape, dtype=_INT_OF_SIZE[values.element_size()], device=values.device)
    dense[kept] = int_view(values)
    return dense.view(values.dtype)


def bitmap_linear(x: torch.Tensor, values: torch.Tensor, bitmap: torch.Tensor, offsets: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias with W [N, K] the decompressed weight (K = x.shape[-1]); x [..., K], y [..., N] in x's
    dtype (W and bias cast to it first)."""
    weight = decompress_bitmap(values, bitmap, offsets, x.shape[-1]).to(x.dtype)
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))
