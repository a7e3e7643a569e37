"""``--method admm``: the layer's sparse regression solved by ADMM, then the least-squares refit on its mask.

The problem SparseGPT approximates in one greedy sweep, min ||(W - Ŵ) X||² over Ŵ with the pattern's zeros, is
split as in ALPS (Meng et al., 2024) and Boža's ADMM pruning (2024): a dense copy D pulled towards the data and a
sparse copy Z, tied by a penalty rho that grows every iteration until they agree. In the input scaling where the
damped Hessian has a unit diagonal (Hn = S⁻¹ H S⁻¹, Wn = W S, S = diag(sqrt H_jj)):

    D = (Wn Hn + rho (Z - U)) (Hn + rho I)⁻¹        the dense step: a Cholesky factorization, two triangular solves
    Z = the pattern's projection of D + U           keep the largest |D + U|: over the whole layer (unstructured)
                                                    or per group of M inputs (N:M)
    U = U + D - Z                                    the scaled dual

rho goes geometrically from ``admm_rho`` to 300x that over ``admm_iters`` iterations. The first mask is Wanda's
criterion over the layer (|W_ij| sqrt(H_jj) is |Wn_ij|). Unlike SparseGPT's mask, chosen once per 128-column block
from weights that only the columns to their left have updated, the projection may move any weight in or out of the
mask at every iteration, with every kept weight adjusted to it. The last mask's kept weights are then refitted
exactly (``sparsekern::lsq_refit``, ``lsq_iters`` CG iterations). Each iteration costs one cols x cols Cholesky
factorization, two triangular solves with [rows, cols] right-hand sides (the flops of one GEMM) and one selection:
on 2 CPU cores, less than one eigendecomposition of Hn and two GEMMs an iteration would cost. Inputs never seen in
calibration are pruned first, as SparseGPT zeroes them.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import ops
from .base import LinearResult, Method
from .lsq import LsqOptions, damped_hessian
from .registry import option, register

RHO_GROWTH = 300.0  # rho's final value over its first: past it D and Z agree and the mask stops moving


# The defaults: on SmolLM2-135M and Gemma-3-270M at 70% (2 CPU cores, 16 x 256 calibration tokens), 12 ADMM and 8 CG
# iterations gave held-out perplexity 162.6 and 84.2 in 118 s and 120 s; 25 and 20 gave 161.7 and 89.6 in over 220 s
# (lower layer errors, not a better model), 10 and 5 gave 168.2 on SmolLM2 in 103 s. SparseGPT: 295.4 in 57 s.
@dataclasses.dataclass
class AdmmOptions(LsqOptions):
    lsq_iters: int = option(8, "lsq: conjugate-gradient iterations of the least-squares refit (one GEMM each)",
                            check=lambda n: None if n >= 1 else "must be 1 or more")
    admm_iters: int = option(12, "admm: ADMM iterations (a Cholesky factorization, two triangular solves and one "
                             "mask selection each)", check=lambda n: None if n >= 1 else "must be 1 or more")
    admm_rho: float = option(0.03, "admm: the first penalty, relative to the unit diagonal of the scaled Hessian "
                             f"(it grows {RHO_GROWTH:g}x over the iterations)",
                             check=lambda r: None if r > 0 else "must be positive")


@dataclasses.dataclass
class Prepared:
    hessian: torch.Tensor  # Hn: the damped Hessian scaled to a unit diagonal
    scale: torch.Tensor  # S: sqrt of the damped Hessian's diagonal
    dead: torch.Tensor  # inputs never active in calibration
    damp: float


@register
class ADMM(Method):
    name = "admm"
    Options = AdmmOptions
    needs = frozenset({"hessian"})
    updates_weights = True

    def prepare(self, stats, where):
        damped = damped_hessian(stats, self.opts.percdamp, where)
        h = damped.hessian
        scale = torch.diagonal(h).sqrt()
        h.div_(scale[:, None]).div_(scale[None, :])
        return Prepared(h, scale, damped.dead, damped.damp)

    def prune_linear(self, weight, prepared: Prepared, pattern, where):
        o = self.opts
        weight[:, prepared.dead] = 0
        wn = weight * prepared.scale
        target = wn @ prepared.hessian  # Wn Hn, the dense step's data term

        def select(values):
            # |values| over the layer (or per N:M group); never-seen inputs carry no weight, so they go first
            scores = values.abs().masked_fill(prepared.dead, 0)
            return ops.topk_mask(scores, pattern.sparsity, pattern.n, pattern.m, False)

        mask = select(wn)
        z = wn.masked_fill(mask, 0)
        u = torch.zeros_like(wn)
        shifted = torch.empty_like(prepared.hessian)
        growth = RHO_GROWTH ** (1.0 / max(o.admm_iters - 1, 1))
        rho = o.admm_rho
        for _ in range(o.admm_iters):
            torch.diagonal(shifted.copy_(prepared.hessian)).add_(rho)
            upper, info = torch.linalg.cholesky_ex(shifted, upper=True)  # Hn + rho I = Uᵀ U
            if info.item():  # Hn is damped and rho > 0: only a non-finite Hessian gets here
                raise FloatingPointError(f"{where}: the scaled Hessian plus {rho:.3g} I is not positive definite")
            # D = rhs (Uᵀ U)⁻¹ = rhs U⁻¹ U⁻ᵀ: solve Y U = rhs, then D Uᵀ = Y
            rhs = (z - u).mul_(rho).add_(target)
            y = torch.linalg.solve_triangular(upper, rhs, upper=True, left=False)
            d = torch.linalg.solve_triangular(upper.mT, y, upper=False, left=False)
            z = d + u
            mask = select(z)
            z.masked_fill_(mask, 0)
            u += d - z
            rho *= growth
        refit, loss = ops.lsq_refit(wn, z, prepared.hessian, mask, o.lsq_iters)
        # back to the checkpoint's scaling; the loss (scale-invariant) is the refit's, in the damped Hessian
        return LinearResult(refit / prepared.scale, loss=float(loss.sum()), damp=prepared.damp, mask=mask)
