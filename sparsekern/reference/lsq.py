"""Least-squares refit of the kept weights on a fixed mask, by conjugate gradients (``sparsekern::lsq_refit``).

For a dense weight W [rows, cols], a mask M (True where pruned) and the layer's (damped) Hessian H = 2/n XᵀX, each
row's kept weights are refitted to reproduce the dense row's outputs on the calibration inputs:

    minimize over v:  (w - v) H (w - v)ᵀ   subject to  v_j = 0 where M_j
    <=>  H_KK v_K = (w H)_K                 (K: the row's kept inputs)

SparseGPT's OBS sweep only moves the weights to the right of each pruned one, and Wanda, RIA and magnitude move
none, so neither ends at this optimum for its own mask. The rows are independent systems sharing H; they are solved
together by Jacobi-preconditioned conjugate gradients, each row with its own step sizes, one [rows, cols] x
[cols, cols] GEMM per iteration, warm-started from the method's weights. Every CG iterate lowers the row's error in
H's norm, so the refit never raises it (with H SPD, which the damping ensures).
"""

from __future__ import annotations

import torch


def lsq_refit(dense: torch.Tensor, start: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor,
              iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(refitted weight [rows, cols] fp32, exact zeros where ``mask``; loss [rows] = (w - v) H (w - v)ᵀ / 2).

    dense: the weights to reproduce; start: where CG starts (its masked entries are ignored); hessian [cols, cols]
    symmetric positive definite (damp it first); at most ``iters`` CG iterations (a row stops when its residual is
    exactly zero)."""
    keep = (~mask).to(torch.float32)
    h = hessian.to(torch.float32)
    w = dense.to(torch.float32)
    v = start.to(torch.float32) * keep
    # residual of the normal equations on the kept entries: r = ((w - v) H)_K
    r = ((w - v) @ h) * keep
    inv_diag = 1.0 / torch.diagonal(h)
    z = r * inv_diag
    p = z.clone()
    rz = (r * z).sum(1, keepdim=True)
    for _ in range(iters):
        hp = (p @ h) * keep
        curvature = (p * hp).sum(1, keepdim=True)
        # a converged row (p = 0) takes no step; the guard keeps its 0/0 out
        alpha = torch.where(curvature > 0, rz / curvature.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        v.addcmul_(alpha, p)
        r.addcmul_(alpha, hp, value=-1.0)
        z = r * inv_diag
        rz_next = (r * z).sum(1, keepdim=True)
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        p = z + beta * p
        rz = rz_next
    delta = w - v
    loss = 0.5 * ((delta @ h) * delta).sum(1)
    return v, loss
