"""Output allocation shared by the launchers.

Launchers allocate every output with :func:`new_output`. Tests set ``POISON = True`` (the ``poisoned_outputs``
fixture) so fresh outputs start as NaN (floats) or 0x7F bytes (ints, bools): an element a kernel forgot to write
then fails the comparison with the reference instead of passing by luck with leftover memory.
"""

from __future__ import annotations

import torch

POISON = False


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        if dtype.is_floating_point:
            out.fill_(float("nan"))
        else:
            out.view(torch.uint8).fill_(0x7F)  # a bool byte of 0x7F is neither False (0) nor True (1)
    return out
