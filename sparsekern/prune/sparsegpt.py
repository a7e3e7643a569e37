"""SparseGPT (Frantar & Alistarh, 2023), optionally joint with weight quantization (the GPTQ grid)."""

from __future__ import annotations

import dataclasses
import warnings

import torch

from .. import ops
from ..reference import NotPositiveDefiniteError
from ..reference.sparsegpt import LAZY_PRECISIONS
from .base import LinearResult, Method
from .stats import HessianStats


# dtypes the Hessian's inputs may be cast to before accumulation (None: as the model produced them).
HESSIAN_DTYPES = (None, "float32", "float16", "bfloat16")


@dataclasses.dataclass
class Prepared:
    hinv_upper: torch.Tensor  # U with U^T U = (H + damp I)^-1
    dead: torch.Tensor  # inputs never active in calibration: their weights are zeroed
    damp: float


class HessianMethod(Method):
    """What SparseGPT and OBC share: the Hessian statistics and the damped inverse-Hessian factor built from it."""

    stats = HessianStats

    def __init__(self, percdamp: float = 0.01, max_damp_tries: int = 4, hessian_dtype: str | None = None):
        if not percdamp > 0:
            raise ValueError(f"percdamp must be positive, got {percdamp}")
        if hessian_dtype not in HESSIAN_DTYPES:
            raise ValueError(f"hessian_dtype must be one of {', '.join(HESSIAN_DTYPES)}, got {hessian_dtype!r}")
        self.percdamp, self.max_damp_tries, self.hessian_dtype = percdamp, max_damp_tries, hessian_dtype

    def new_stats(self, columns, device, where):
        input_dtype = None if self.hessian_dtype is None else getattr(torch, self.hessian_dtype)
        return HessianStats(columns, device, where, input_dtype)

    def options(self):
        return {"percdamp": self.percdamp, "hessian_dtype": self.hessian_dtype}

    def prepare(self, stats: HessianStats, where: str) -> Prepared:
        """The damped inverse-Hessian factor. Consumes ``stats``: its Hessian's buffer becomes U (in place, so a
        layer needs one n x n buffer, not two), and the statistic is not used again."""
        hessian = stats.hessian.contiguous()
        if not torch.isfinite(hessian).all():
            raise FloatingPointError(f"{where}: the Hessian of the calibration inputs has NaN or Inf entries")
        diag = torch.diagonal(hessian)
        dead = diag == 0
        first_damp = self.percdamp * torch.where(dead, torch.ones_like(diag), diag).mean().item()
        try:
            damp = ops.hinv_cholesky_(hessian, self.percdamp, self.max_damp_tries)
        except NotPositiveDefiniteError as exc:
            raise NotPositiveDefiniteError(
                f"{where}: Hessian {exc}; raise --percdamp (now {self.percdamp}) or use more calibration "
                "samples (--nsamples)"
            ) from None
        damp = float(damp)
        if damp > first_damp * 1.5:
            warnings.warn(
                f"{where}: Hessian not positive definite with damping {first_damp:.3g}; "
                f"used {damp:.3g} (x{damp / first_damp:.0f}). Consider more calibration samples.",
                stacklevel=2,
            )
        return Prepared(hessian, dead, damp)


class SparseGPT(HessianMethod):
    name = "sparsegpt"

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01, wbits: int = 0, groupsize: int = 0,
                 max_damp_tries: int = 4, lazy_precision: str = "ieee", hessian_dtype: str | None = None):
        super().__init__(percdamp, max_damp_tries, hessian_dtype)
        if blocksize <= 0:
            raise ValueError(f"blocksize must be positive, got {blocksize}")
        if wbits and not 2 <= wbits <= 16:
            # One bit leaves a grid of two levels, min and max: most kept weights round to one of them and many to
            # zero, far past the pattern's sparsity (94.95% zeros at "50%" on SmolLM2).
            raise ValueError(f"wbits must be between 2 and 16 (or 0 for no quantization), got {wbits}")
        if groupsize and not wbits:
            raise ValueError("groupsize only applies with quantization: pass wbits too")
        if wbits and groupsize and blocksize % groupsize and groupsize % blocksize:
            raise ValueError(
                f"groupsize {groupsize} must divide blocksize {blocksize} or be a multiple of it "
                f"(e.g. --groupsize {blocksize})"
            )
        if lazy_precision not in LAZY_PRECISIONS:
            raise ValueError(f"lazy_precision must be one of {', '.join(LAZY_PRECISIONS)}, got {lazy_precision!r}")
        self.blocksize, self.wbits, self.groupsize, self.lazy_precision = blocksize, wbits, groupsize, lazy_precision

    def options(self):
        return {"blocksize": self.blocksize, "percdamp": self.percdamp, "wbits": self.wbits,
                "groupsize": self.groupsize, "lazy_precision": self.lazy_precision,
                "hessian_dtype": self.hessian_dtype}

    def validate(self, pattern, where):
        if pattern.is_nm and self.blocksize % pattern.m:
            raise ValueError(f"{where}: --blocksize {self.blocksize} is not a multiple of M={pattern.m} of {pattern}")

    def prune_linear(self, weight, prepared: Prepared, pattern, where):
        weight[:, prepared.dead] = 0
        pruned, loss, _scale, _zero = ops.sparsegpt_prune(
            weight, prepared.hinv_upper, pattern.sparsity, pattern.n, pattern.m, self.blocksize,
            self.wbits, self.groupsize, self.lazy_precision,
        )
        return LinearResult(pruned, loss=float(loss.sum()), damp=prepared.damp)
