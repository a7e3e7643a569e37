"""Reference asymmetric min-max weight quantization (the GPTQ/SparseGPT grid), per output row."""

from __future__ import annotations

import torch


def minmax_params(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``scale`` and integer ``zero`` of an asymmetric ``bits``-bit grid covering each row and 0.

    The grid always contains 0 (``zero`` is an integer in [0, 2**bits - 1]), so pruned weights stay exactly 0.
    Returns two [rows] tensors.
    """
    maxq = 2**bits - 1
    lo = torch.clamp(weight.min(dim=1).values, max=0)
    hi = torch.clamp(weight.max(dim=1).values, min=0)
    flat = (lo == 0) & (hi == 0)
    lo = torch.where(flat, torch.full_like(lo, -1), lo)
    hi = torch.where(flat, torch.full_like(hi, 1), hi)
    scale = (hi - lo) / maxq
    zero = torch.round(-lo / scale)
    return scale, zero


def quantize(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round ``weight`` (rows along dim 0) to its grid ``scale * (q - zero)``, q an integer in [0, 2**bits - 1]."""
    maxq = 2**bits - 1
    if weight.dim() == 2:
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    q = torch.clamp(torch.round(weight / scale) + zero, 0, maxq)
    return scale * (q - zero)
