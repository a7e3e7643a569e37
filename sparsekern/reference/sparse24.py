"""Reference 2:4 compressed weights: kept values plus packed 2-bit positions, and the linear layer over them.

Format, for a weight W [N, K] (K divisible by 4) with at most 2 nonzeros in every group of 4 along K:
- ``values`` [N, K/2], W's dtype: for group g of row n, values[n, 2g] and values[n, 2g + 1] are the entries at
  positions idx0 < idx1 of the group (nonzeros first; a group with fewer than 2 nonzeros keeps zeros from its
  lowest free positions, so idx0 < idx1 always).
- ``meta`` [N, ceil(K/32)] int32: group g's nibble idx0 | idx1 << 2 sits at bits 4*(g % 8) .. 4*(g % 8) + 3 of
  meta[n, g // 8] (8 groups per word; a row's last word is zero-padded).
Decompression puts values[n, 2g + s] at column 4g + idx_s, zeros elsewhere: an exact round trip.
"""

from __future__ import annotations

import torch

GROUPS_PER_WORD = 8


def check_24(weight: torch.Tensor, what: str = "weight") -> None:
    """Raise ValueError naming the first group of 4 along K with more than 2 nonzeros."""
    rows, cols = weight.shape
    if cols % 4:
        raise ValueError(f"{what} has {cols} input columns; 2:4 needs a multiple of 4")
    counts = (weight.reshape(rows, cols // 4, 4) != 0).sum(-1)
    bad = (counts > 2).nonzero()
    if bad.numel():
        row, group = (int(i) for i in bad[0])
        raise ValueError(
            f"{what} is not 2:4: row {row}, columns {4 * group}..{4 * group + 3} hold {int(counts[row, group])} "
            f"nonzeros ({int((counts > 2).sum())} such groups); prune it to 2:4 first (sparsekern prune --sparsity 2:4)"
        )


def compress_24(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [N, K/2], meta [N, ceil(K/32)] int32) of a 2:4 weight [N, K]; see the module docstring."""
    check_24(weight)
    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // 4, 4)
    position = torch.arange(4, device=weight.device)
    # Nonzeros first, then free positions, each by position; keep the first two, in position order.
    key = torch.where(groups != 0, position, position + 4)
    kept = key.argsort(dim=-1)[..., :2].sort(dim=-1).values  # [N, G, 2] positions idx0 < idx1
    values = groups.gather(-1, kept).reshape(rows, cols // 2)
    nibbles = (kept[..., 0] | (kept[..., 1] << 2)).to(torch.int64)  # [N, G]
    words = -(-(cols // 4) // GROUPS_PER_WORD)
    padded = torch.zeros(rows, words * GROUPS_PER_WORD, dtype=torch.int64, device=weight.device)
    padded[:, : cols // 4] = nibbles
    shifts = 4 * torch.arange(GROUPS_PER_WORD, device=weight.device)
    packed = (padded.reshape(rows, words, GROUPS_PER_WORD) << shifts).sum(-1)
    meta = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # the same 32 bits, signed
    return values.contiguous(), meta


def unpack_positions(meta: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, groups, 2] int64 positions (idx0, idx1) of every group, from the packed words."""
    shifts = 4 * torch.arange(GROUPS_PER_WORD, device=meta.device)
    nibbles = (meta.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF  # [N, words, 8]
    nibbles = nibbles.reshape(meta.shape[0], -1)[:, :groups]
    return torch.stack([nibbles & 3, nibbles >> 2], dim=-1)


def decompress_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The dense weight [N, K] (K = 2 * values.shape[1]) of a compressed 2:4 weight."""
    rows, half = values.shape
    groups = half // 2
    dense = values.new_zeros(rows, groups, 4)
    dense.scatter_(-1, unpack_positions(meta, groups), values.reshape(rows, groups, 2))
    return dense.reshape(rows, 2 * half)


def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                    bias: torch.Tensor | None = None, perm: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias with W the decompressed weight; x [..., K], y [..., N] in x's dtype. perm [K] int32/int64
    or None: W is stored in permuted input order (W = W_original[:, perm]) and y = x[..., perm] @ W^T + bias."""
    if perm is not None:
        x = x.index_select(-1, perm)
    return torch.nn.functional.linear(x, decompress_24(values, meta).to(x.dtype),
                                      None if bias is None else bias.to(x.dtype))
