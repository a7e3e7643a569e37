"""Compressed sparse weight formats: how a pruned linear layer's weight is stored, on the GPU and on disk.

A format turns a dense weight [out_features, in_features] into named tensors (the buffers of a ``SparseLinear``
and the tensors of a compressed checkpoint) and back, exactly, and computes y = x W^T + b from them with its
kernel. One module per format, each defining one :class:`Format`:

- ``2:4`` (``formats/sparse24.py``): at most 2 nonzeros in every 4 consecutive inputs; values [N, K/2] + 2-bit
  positions. 56% of the dense fp16 bytes; layers made 2:4 in a permuted input order carry a ``perm`` too.
- ``bitmap`` (``formats/bitmap.py``): any unstructured mask; a bit per weight + the kept values + per-tile
  offsets. 2(1 - s) + 5/32 bytes per weight in fp16: 58% of dense at 50% sparsity, 38% at 70%.

:func:`choose` picks the format for a weight: 2:4 where the weight is 2:4 (smaller than the bitmap up to ~52%
sparsity, and its kernel expands without gathers), else the bitmap where it saves at least ``MIN_SAVING`` of the
dense bytes, else none (the layer stays dense). Adding a format is one module here, its ops and its tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# A layer is stored compressed only if that saves at least this fraction of its dense bytes: below it the
# kernel's extra work (expanding tiles, gathers) is unlikely to pay for the bytes it saves (SpInfer's bitmap
# kernel beats cuBLAS from ~30% sparsity; the bitmap reaches 25% savings at 33% sparsity in fp16).
MIN_SAVING = 0.25


@dataclass(frozen=True)
class Format:
    """A compressed weight format: ``buffers`` name its tensors in a layer's state_dict (besides bias and perm)."""

    name: str
    buffers: tuple[str, ...]
    # weight [N, K] -> {buffer: tensor}; raises ValueError naming ``what`` if the weight does not fit the format
    compress: Callable[[torch.Tensor, str], dict[str, torch.Tensor]]
    # ({buffer: tensor}, in_features) -> the dense weight [N, K], bit-exact
    decompress: Callable[[dict[str, torch.Tensor], int], torch.Tensor]
    # (x, {buffer: tensor}, bias, perm) -> y = x[..., perm] W^T + bias on the format's kernel
    linear: Callable[..., torch.Tensor]
    # (out_features, in_features, dtype, device, {buffer: shape} or None) -> zero-filled buffers of a layer; the
    # shapes (from a checkpoint) fix the data-dependent sizes (the bitmap's number of kept values)
    empty: Callable[..., dict[str, torch.Tensor]]
    # (weight) -> bytes of the compressed form, or None if the weight does not fit the format
    nbytes: Callable[[torch.Tensor], int | None]
    # ({buffer: tensor}, in_features, what) -> raise ValueError naming ``what`` unless the tensors are consistent
    validate: Callable[[dict[str, torch.Tensor], int, str], None]
    takes_perm: bool = False  # the kernel gathers x[..., perm] (channel-permuted N:M layers)


def formats() -> dict[str, Format]:
    from .bitmap import BITMAP
    from .sparse24 import SPARSE24

    return {SPARSE24.name: SPARSE24, BITMAP.name: BITMAP}


def get(name: str) -> Format:
    known = formats()
    if name not in known:
        raise ValueError(f"unknown sparse format {name!r}; sparsekern knows {', '.join(known)}")
    return known[name]


def of_buffers(names) -> Format | None:
    """The format whose buffers are all among ``names`` (e.g. a layer's keys in a state_dict), the one with most
    buffers if several fit (2:4's ``values``, ``meta`` vs the bitmap's ``values``, ``bitmap``, ``offsets``)."""
    names = set(names)
    fitting = [fmt for fmt in formats().values() if set(fmt.buffers) <= names]
    return max(fitting, key=lambda fmt: len(fmt.buffers), default=None)


def dense_nbytes(weight: torch.Tensor) -> int:
    return weight.numel() * weight.element_size()


def choose(weight: torch.Tensor, permuted: bool = False) -> Format | None:
    """The format to store ``weight`` in: the smallest that fits and saves at least ``MIN_SAVING`` of its dense
    bytes, else None (keep it dense). permuted: the weight is given in a permuted input order; only formats whose
    kernel gathers x (2:4) can take it."""
    best, best_bytes = None, (1 - MIN_SAVING) * dense_nbytes(weight)
    for fmt in formats().values():
        if permuted and not fmt.takes_perm:
            continue
        size = fmt.nbytes(weight)
        if size is not None and size <= best_bytes:
            best, best_bytes = fmt, size
    return best


__all__ = ["Format", "MIN_SAVING", "choose", "dense_nbytes", "formats", "get", "of_buffers"]
