"""The 2:4 format (layout: ``sparsekern.reference.sparse24``): values [N, K/2] in the weight's dtype and meta
[N, ceil(K/32)] int32 (2-bit positions of the kept pair of every group of 4 inputs)."""

from __future__ import annotations

import torch

from .. import ops
from ..reference.sparse24 import check_24, unpack_positions
from . import Format


def _compress(weight: torch.Tensor, what: str = "weight") -> dict[str, torch.Tensor]:
    check_24(weight, what=what)  # names the layer; compress_24 alone could only say "weight"
    values, meta = ops.compress_24(weight)
    return {"values": values, "meta": meta}


def _decompress(buffers: dict[str, torch.Tensor], in_features: int) -> torch.Tensor:
    return ops.decompress_24(buffers["values"], buffers["meta"])


def _linear(x, buffers, bias=None, perm=None):
    return ops.sparse24_linear(x, buffers["values"], buffers["meta"], bias, perm)


def _empty(out_features: int, in_features: int, dtype: torch.dtype, device=None, shapes=None) -> dict:
    if in_features % 4:
        raise ValueError(f"in_features {in_features} is not a multiple of 4, so the layer cannot be 2:4")
    return {"values": torch.zeros(out_features, in_features // 2, dtype=dtype, device=device),
            "meta": torch.zeros(out_features, -(-in_features // 32), dtype=torch.int32, device=device)}


def _nbytes(weight: torch.Tensor) -> int | None:
    rows, cols = weight.shape
    if cols % 4 or not bool(((weight.detach().reshape(rows, cols // 4, 4) != 0).sum(-1) <= 2).all()):
        return None
    return rows * (cols // 2 * weight.element_size() + -(-cols // 32) * 4)


def _validate(buffers: dict[str, torch.Tensor], in_features: int, what: str) -> None:
    """Every group's positions idx0 < idx1 (a damaged meta word decodes to something else)."""
    values, meta = buffers["values"], buffers["meta"]
    if values.dim() != 2 or values.shape[1] * 2 != in_features or meta.shape != (values.shape[0], -(-in_features // 32)):
        raise ValueError(f"{what}: values {tuple(values.shape)} and meta {tuple(meta.shape)} do not describe a 2:4 "
                         f"weight with {in_features} inputs")
    positions = unpack_positions(meta, in_features // 4)
    bad = (positions[..., 0] >= positions[..., 1]).nonzero()
    if bad.numel():
        row, group = (int(i) for i in bad[0])
        raise ValueError(f"{what}: meta is damaged (row {row}, group {group} decodes to positions "
                         f"{positions[row, group].tolist()}, not two increasing ones)")
    tail = meta.to(torch.int64) & 0xFFFFFFFF
    if in_features % 32 and bool((tail[:, -1] >> (4 * (in_features % 32 // 4))).ne(0).any()):
        raise ValueError(f"{what}: meta is damaged (padding bits past the last group are set)")


SPARSE24 = Format(name="2:4", buffers=("values", "meta"), compress=_compress, decompress=_decompress,
                  linear=_linear, empty=_empty, nbytes=_nbytes, validate=_validate, takes_perm=True)
