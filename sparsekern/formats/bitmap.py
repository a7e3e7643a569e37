"""The bitmap format for unstructured sparsity (layout: ``sparsekern.reference.bitmap``): values [nnz] in the
weight's dtype, bitmap [N, ceil(K/32)] int32 (a bit per weight: kept or not), offsets [N, ceil(K/128)] int32
(where each row's 128-column tile starts in values)."""

from __future__ import annotations

import torch

from .. import ops
from ..reference.bitmap import TILE, WORD
from . import Format


def _compress(weight: torch.Tensor, what: str = "weight") -> dict[str, torch.Tensor]:
    if weight.dim() != 2:
        raise ValueError(f"{what} must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    values, bitmap, offsets = ops.compress_bitmap(weight)
    return {"values": values, "bitmap": bitmap, "offsets": offsets}


def _decompress(buffers: dict[str, torch.Tensor], in_features: int) -> torch.Tensor:
    return ops.decompress_bitmap(buffers["values"], buffers["bitmap"], buffers["offsets"], in_features)


def _linear(x, buffers, bias=None, perm=None):
    if perm is not None:
        raise ValueError("the bitmap format takes no input permutation (only 2:4 layers are channel-permuted)")
    return ops.bitmap_linear(x, buffers["values"], buffers["bitmap"], buffers["offsets"], bias)


def _empty(out_features: int, in_features: int, dtype: torch.dtype, device=None, shapes=None) -> dict:
    nnz = shapes["values"][0] if shapes and len(shapes["values"]) == 1 else 0
    return {"values": torch.zeros(nnz, dtype=dtype, device=device),
            "bitmap": torch.zeros(out_features, -(-in_features // WORD), dtype=torch.int32, device=device),
            "offsets": torch.zeros(out_features, -(-in_features // TILE), dtype=torch.int32, device=device)}


def kept(weight: torch.Tensor) -> torch.Tensor:
    """What the format stores: every entry whose bits are not those of +0.0 (so -0.0 and NaN are kept)."""
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[weight.element_size()]
    return weight.detach().contiguous().view(bits) != 0


def _nbytes(weight: torch.Tensor) -> int:
    rows, cols = weight.shape
    return int(kept(weight).sum()) * weight.element_size() + rows * 4 * (-(-cols // WORD) + -(-cols // TILE))


def _popcount(bitmap: torch.Tensor) -> torch.Tensor:
    """Set bits per int32 word [N, W], as int64, by the SWAR bit count in int32 arithmetic (wrapping products;
    every mask clears the bits an arithmetic shift drags in): a 7B layer's bitmap in tens of ms on a CPU, where
    expanding every bit took seconds."""
    x = bitmap.contiguous()
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24).to(torch.int64) & 0xFF


def _validate(buffers: dict[str, torch.Tensor], in_features: int, what: str) -> None:
    """The bitmap's bit count is the number of values, and the offsets are the running counts it implies."""
    values, bitmap, offsets = buffers["values"], buffers["bitmap"], buffers["offsets"]
    rows, words, tiles = bitmap.shape[0], -(-in_features // WORD), -(-in_features // TILE)
    if values.dim() != 1 or bitmap.shape != (rows, words) or offsets.shape != (rows, tiles):
        raise ValueError(f"{what}: values {tuple(values.shape)}, bitmap {tuple(bitmap.shape)}, offsets "
                         f"{tuple(offsets.shape)} do not describe a bitmap weight with {in_features} inputs "
                         f"(expected [nnz], [{rows}, {words}], [{rows}, {tiles}])")
    counts = _popcount(bitmap)
    if in_features % WORD and rows and bool(((bitmap[:, -1].to(torch.int64) & 0xFFFFFFFF)
                                             >> (in_features % WORD)).ne(0).any()):
        raise ValueError(f"{what}: bitmap is damaged (bits set past the last input column)")
    if int(counts.sum()) != values.numel():
        raise ValueError(f"{what}: bitmap marks {int(counts.sum())} kept weights but values holds {values.numel()}: "
                         "the tensors are damaged or from different layers")
    per_tile = torch.nn.functional.pad(counts, (0, tiles * (TILE // WORD) - words)).reshape(rows, tiles, -1).sum(-1)
    expected = (per_tile.flatten().cumsum(0) - per_tile.flatten()).reshape(rows, tiles)
    if not torch.equal(offsets.to(torch.int64), expected):
        row, tile = (int(i) for i in (offsets.to(torch.int64) != expected).nonzero()[0])
        raise ValueError(f"{what}: offsets are damaged (row {row}, tile {tile} holds {int(offsets[row, tile])}, the "
                         f"bitmap implies {int(expected[row, tile])})")


BITMAP = Format(name="bitmap", buffers=("values", "bitmap", "offsets"), compress=_compress, decompress=_decompress,
                linear=_linear, empty=_empty, nbytes=_nbytes, validate=_validate)
