"""Reference calibration statistics and the inverse-Hessian factor SparseGPT sweeps with."""

from __future__ import annotations

import torch


class NotPositiveDefiniteError(RuntimeError):
    """The damped Hessian could not be factorized even after escalating the damping."""


def hessian_update(hessian: torch.Tensor, x: torch.Tensor, count: int) -> int:
    """Fold a batch of layer inputs into the running Hessian H = 2/n * sum x x^T, in place.

    hessian: [k, k] fp32 (the mean over the ``count`` rows seen so far); x: [..., k] inputs of any float dtype.
    H <- (count * H + 2 * X^T X) / (count + m). Returns the new count.
    """
    x = x.reshape(-1, x.shape[-1])
    m = x.shape[0]
    if m == 0:
        return count
    total = count + m
    x = x.to(hessian.dtype) * (2.0 / total) ** 0.5
    hessian.mul_(count / total).addmm_(x.t(), x)
    return total


def sumsq_update(sumsq: torch.Tensor, x: torch.Tensor, count: int) -> int:
    """Fold a batch into the running per-channel mean of squares (Wanda's ||X_j||^2 / n), in place."""
    x = x.reshape(-1, x.shape[-1])
    m = x.shape[0]
    if m == 0:
        return count
    total = count + m
    sumsq.mul_(count / total).add_(x.to(sumsq.dtype).pow(2).sum(dim=0), alpha=1.0 / total)
    return total


def hinv_cholesky(hessian: torch.Tensor, percdamp: float = 0.01, max_tries: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor U of the damped inverse Hessian (U^T U = (H + damp I)^-1), as SparseGPT uses it.

    Dead inputs (zero diagonal) get a unit diagonal; damp = percdamp * mean(diag H), multiplied by 10 after each
    failed factorization, at most ``max_tries`` attempts. Returns (U, damp) with damp a 0-dim tensor; raises
    NotPositiveDefiniteError when every attempt fails. The three-call sequence of the published code
    (Cholesky, inverse from Cholesky, Cholesky again); the native op (csrc/hinv_cholesky) needs one factorization
    and one triangular inverse, in place.
    """
    h = hessian.clone()
    diag = torch.diagonal(h)
    diag[diag == 0] = 1
    damp = percdamp * diag.mean()
    if not torch.isfinite(damp):
        raise NotPositiveDefiniteError("the Hessian has non-finite entries")
    for _ in range(max(1, max_tries)):
        attempt = h.clone()
        torch.diagonal(attempt).add_(damp)
        lower, info = torch.linalg.cholesky_ex(attempt)
        if info.item() == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info.item() == 0 and torch.isfinite(upper).all():
                return upper.contiguous(), damp  # cholesky(upper=True) is column-major
        damp = damp * 10
    raise NotPositiveDefiniteError(
        f"not positive definite after {max(1, max_tries)} tries (last damping {float(damp) / 10:.3g})"
    )
