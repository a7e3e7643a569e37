"""SparseGPT (Frantar & Alistarh, 2023), optionally joint with weight quantization (the GPTQ grid)."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import torch

from .. import ops
from ..reference import NotPositiveDefiniteError
from ..reference.sparsegpt import LAZY_PRECISIONS
from .base import LinearResult, Method
from .registry import option, register
from .stats import HessianStats, part


# dtypes the Hessian's inputs may be cast to before accumulation (None: as the model produced them).
HESSIAN_DTYPES = (None, "float32", "float16", "bfloat16")


def _positive(value):
    return None if value > 0 else "must be positive"


@dataclasses.dataclass
class DampedHessianOptions:
    """What every step that works with the damped Hessian takes."""

    percdamp: float = option(0.01, "Hessian damping as a fraction of its mean diagonal", check=_positive)
    hessian_dtype: Optional[str] = option(
        None, "cast calibration inputs to float32/float16/bfloat16 before accumulating the Hessian in fp32 "
        "(default: as the model produces them)", choices=HESSIAN_DTYPES)


@dataclasses.dataclass
class HessianOptions(DampedHessianOptions):
    """What every step that builds the damped inverse-Hessian factor takes."""

    max_damp_tries: int = option(4, "factorization attempts, damping x10 after each failure", check=_positive)


@dataclasses.dataclass
class Prepared:
    hinv_upper: torch.Tensor  # U with U^T U = (H + damp I)^-1
    dead: torch.Tensor  # inputs never active in calibration: their weights are zeroed
    damp: float


def inverse_hessian_factor(stats, opts: HessianOptions, where: str) -> Prepared:
    """The damped inverse-Hessian factor. Consumes the Hessian statistic: its buffer becomes U (in place, so a
    layer needs one n x n buffer, not two), and the statistic is not used again."""
    hessian = part(stats, HessianStats).hessian.contiguous()
    if not torch.isfinite(hessian).all():
        raise FloatingPointError(f"{where}: the Hessian of the calibration inputs has NaN or Inf entries")
    diag = torch.diagonal(hessian)
    dead = diag == 0
    first_damp = opts.percdamp * torch.where(dead, torch.ones_like(diag), diag).mean().item()
    try:
        damp = ops.hinv_cholesky_(hessian, opts.percdamp, opts.max_damp_tries)
    except NotPositiveDefiniteError as exc:
        raise NotPositiveDefiniteError(
            f"{where}: Hessian {exc}; raise --percdamp (now {opts.percdamp}) or use more calibration "
            "samples (--nsamples)"
        ) from None
    damp = float(damp)
    if damp > first_damp * 1.5:
        warnings.warn(
            f"{where}: Hessian not positive definite with damping {first_damp:.3g}; "
            f"used {damp:.3g} (x{damp / first_damp:.0f}). Consider more calibration samples.",
            stacklevel=3,
        )
    return Prepared(hessian, dead, damp)


class HessianMethod(Method):
    """What SparseGPT and OBC share: the Hessian statistics and the damped inverse-Hessian factor built from it."""

    needs = frozenset({"hessian"})
    updates_weights = True

    def prepare(self, stats, where: str) -> Prepared:
        return inverse_hessian_factor(stats, self.opts, where)


def _check_wbits(wbits):
    # One bit leaves a grid of two levels, min and max: most kept weights round to one of them and many to zero,
    # far past the pattern's sparsity (94.95% zeros at "50%" on SmolLM2).
    return None if wbits == 0 or 2 <= wbits <= 16 else "must be between 2 and 16 (or 0 for no quantization)"


@dataclasses.dataclass
class SweepOptions:
    blocksize: int = option(128, "columns per sweep block, and per adaptive-mask block", check=_positive)
    lazy_precision: str = option("ieee", "precision of the lazy-update GEMM: ieee (fp32, default) or tf32 "
                                 "(tensor cores)", choices=LAZY_PRECISIONS)


@dataclasses.dataclass
class SparseGPTOptions(HessianOptions, SweepOptions):
    wbits: int = option(0, "SparseGPT: also quantize kept weights to this many bits (0: no quantization)",
                        check=_check_wbits)
    groupsize: int = option(0, "SparseGPT: quantization group size (0: one grid per row)",
                            check=lambda g: None if g >= 0 else "must be 0 or positive")


@register
class SparseGPT(HessianMethod):
    name = "sparsegpt"
    Options = SparseGPTOptions

    def __init__(self, options=None, **values):
        super().__init__(options, **values)
        o = self.opts
        if o.groupsize and not o.wbits:
            raise ValueError("--groupsize only applies with quantization: pass --wbits too")
        if o.wbits and o.groupsize and o.blocksize % o.groupsize and o.groupsize % o.blocksize:
            raise ValueError(
                f"--groupsize {o.groupsize} must divide --blocksize {o.blocksize} or be a multiple of it "
                f"(e.g. --groupsize {o.blocksize})"
            )

    def validate(self, pattern, where):
        if pattern.is_nm and self.opts.blocksize % pattern.m:
            raise ValueError(f"{where}: --blocksize {self.opts.blocksize} is not a multiple of M={pattern.m} of "
                             f"{pattern}")

    def prune_linear(self, weight, prepared: Prepared, pattern, where):
        o = self.opts
        weight[:, prepared.dead] = 0
        pruned, loss, _scale, _zero = ops.sparsegpt_prune(
            weight, prepared.hinv_upper, pattern.sparsity, pattern.n, pattern.m, o.blocksize,
            o.wbits, o.groupsize, o.lazy_precision,
        )
        return LinearResult(pruned, loss=float(loss.sum()), damp=prepared.damp)
