"""The 2:4 format (layout: ``sparsekern.reference.sparse24``): values [N, K/2] in the weight's dtype and meta
[N, ceil(K/32)] int32 (2-bit positions of the kept pair of every group of 4 inputs)."""

from __future__ import annotations

import torch

from .. import ops
from ..reference.sparse24 import check_24
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


# Bit v set where nibble value v = idx0 | idx1 << 2 has idx0 < idx1: (0,1) 4, (0,2) 8, (1,2) 9, (0,3) 12, (1,3) 13,
# (2,3) 14. Any other nibble of a real group is a damaged word.
_VALID_NIBBLES = (1 << 4) | (1 << 8) | (1 << 9) | (1 << 12) | (1 << 13) | (1 << 14)


def _validate(buffers: dict[str, torch.Tensor], in_features: int, what: str) -> None:
    """Every group's positions idx0 < idx1, and the padding nibbles past the last group zero (a damaged meta word
    decodes to something else). int32 work on the words, 8 nibbles a pass: a 7B layer in tens of ms on a CPU."""
    values, meta = buffers["values"], buffers["meta"]
    if values.dim() != 2 or values.shape[1] * 2 != in_features or meta.shape != (values.shape[0], -(-in_features // 32)):
        raise ValueError(f"{what}: values {tuple(values.shape)} and meta {tuple(meta.shape)} do not describe a 2:4 "
                         f"weight with {in_features} inputs")
    groups = in_features // 4
    for slot in range(8):
        nibble = (meta >> (4 * slot)) & 0xF
        real = (groups - slot + 7) // 8  # words whose nibble ``slot`` is a group; past them it is padding
        bad = ((_VALID_NIBBLES >> nibble[:, :real]) & 1) == 0
        if bool(bad.any()):
            row, index = (int(i) for i in bad.nonzero()[0])
            value = int(nibble[row, index])
            raise ValueError(f"{what}: meta is damaged (row {row}, group {8 * index + slot} decodes to positions "
                             f"{[value & 3, value >> 2]}, not two increasing ones)")
        if bool((nibble[:, real:] != 0).any()):
            row = int((nibble[:, real:] != 0).any(1).nonzero()[0])
            raise ValueError(f"{what}: meta is damaged (row {row}: padding bits past the last group are set)")


SPARSE24 = Format(name="2:4", buffers=("values", "meta"), compress=_compress, decompress=_decompress,
                  linear=_linear, empty=_empty, nbytes=_nbytes, validate=_validate, takes_perm=True)
