"""Reference Cholesky-factor updates by Givens rotations: the spec of the native kernels (csrc/) and their fallback.

Both ops take upper factors R (R^T R = M), batched over leading dimensions, read only the upper triangle, and
return new factors with a positive diagonal and exact zeros below it. The loops run over columns with every batch
entry in lockstep, so they cost O(n) Python steps of batched tensor work; the native ops are the fast path.
"""

from __future__ import annotations

import torch

from .hessian import NotPositiveDefiniteError

FLOAT_DTYPES = (torch.float32, torch.float64)


def _batched(upper: torch.Tensor, name: str) -> torch.Tensor:
    if upper.dim() < 2 or upper.shape[-1] != upper.shape[-2]:
        raise ValueError(f"{name} must be [..., n, n], got shape {tuple(upper.shape)}")
    if upper.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32 or float64, got {upper.dtype}")
    n = upper.shape[-1]
    return upper.reshape(-1, n, n).triu()


def cholesky_update(upper: torch.Tensor, x: torch.Tensor, downdate: bool) -> torch.Tensor:
    """R' with R'^T R' = R^T R + X^T X (downdate: - X^T X), by one rank-1 Givens sweep per row of X.

    upper [..., n, n] upper triangular with a positive diagonal; x [..., k, n] in the same batch shape. Raises
    NotPositiveDefiniteError naming the batch entry and column where a downdate would leave the matrix indefinite.
    """
    r = _batched(upper, "upper")
    batch, n = r.shape[0], r.shape[-1]
    if x.shape[:-2] != upper.shape[:-2] or x.shape[-1] != n or x.dim() != upper.dim():
        raise ValueError(f"x must be [..., k, {n}] with the batch shape of upper {tuple(upper.shape[:-2])}, "
                         f"got {tuple(x.shape)}")
    rows = x.reshape(batch, -1, n).to(r.dtype)
    sign = -1.0 if downdate else 1.0
    for t in range(rows.shape[1]):
        v = rows[:, t].clone()
        for j in range(n):
            d, a = r[:, j, j], v[:, j]
            squared = d * d + sign * a * a
            if downdate and not bool((squared > 0).all()):
                entry = int((~(squared > 0)).nonzero()[0])
                raise NotPositiveDefiniteError(
                    f"cholesky_update: the downdate by row {t} of x makes the matrix indefinite at batch entry "
                    f"{entry}, column {j}")
            diag = squared.sqrt()
            c, s, inverse_c = (diag / d)[:, None], (a / d)[:, None], (d / diag)[:, None]
            r[:, j, j] = diag
            new_row = (r[:, j, j + 1:] + sign * s * v[:, j + 1:]) * inverse_c
            r[:, j, j + 1:] = new_row
            v[:, j + 1:] = c * v[:, j + 1:] - s * new_row
    return r.reshape(upper.shape)


def cholesky_delete(upper: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove variable ``index[b]`` from each factor: (R' [..., n-1, n-1], dropped [..., n]).

    Column q = index[b] moves to the front and Givens rotations of rows (i-1, i), i = q..1, zero it below row 0;
    R' is what remains after dropping the first row and column: R'^T R' is the Schur complement of M_qq in
    M = R^T R, i.e. for R the upper factor of H^-1, R' is the upper factor of (H without q)^-1 (exact OBS
    elimination). ``dropped`` is the removed first row in the original column order, dropped[q] = sqrt(M_qq), so
    dropped * dropped[q] is row q of M (of H^-1, the row the OBS weight update needs).
    """
    r = _batched(upper, "upper")
    batch, n = r.shape[0], r.shape[-1]
    if n < 1:
        raise ValueError("cannot delete from an empty factor")
    index = torch.as_tensor(index)
    # The native op's checks: an integer tensor in the batch shape, every entry a column.
    if (index.is_floating_point() or index.dtype == torch.bool or index.shape != upper.shape[:-2]
            or (index < 0).any() or (index >= n).any()):
        raise ValueError(f"index must hold one column per batch entry, shape {tuple(upper.shape[:-2])}, each in "
                         f"[0, {n}), got {index.tolist() if index.numel() <= 8 else tuple(index.shape)}")
    index = index.reshape(-1).to(torch.long)
    entries = torch.arange(batch)
    kept = torch.arange(n - 1).expand(batch, n - 1)
    kept = kept + (kept >= index[:, None]).long()  # original column of each kept column
    columns = r.gather(2, kept[:, None, :].expand(batch, n, n - 1))  # [B, n, n-1]: every column but q
    out = columns[:, 1:].clone()  # rows below q only shift up; rows 1..q are replaced below
    carry, carry_q = columns[entries, index].clone(), r[entries, index, index].clone()
    for i in range(int(index.max()), 0, -1):
        active = i <= index
        a = r[entries, i - 1, index]
        radius = torch.hypot(a, carry_q)
        nonzero = radius > 0
        c = torch.where(nonzero, a / torch.where(nonzero, radius, 1), 1)[:, None]
        s = torch.where(nonzero, carry_q / torch.where(nonzero, radius, 1), 0)[:, None]
        above = columns[:, i - 1]
        final = c * carry - s * above  # row i, now upper triangular; its diagonal sits at kept column i - 1
        final = torch.where(final[:, i - 1 : i] < 0, -final, final)
        out[active, i - 1] = final[active]
        carry = torch.where(active[:, None], c * above + s * carry, carry)
        carry_q = torch.where(active, radius, carry_q)
    dropped = r.new_empty(batch, n)
    dropped.scatter_(1, kept, carry)
    dropped[entries, index] = carry_q
    return out.reshape(*upper.shape[:-2], n - 1, n - 1), dropped.reshape(*upper.shape[:-2], n)
