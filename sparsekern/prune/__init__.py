"""Pruning algorithms over the public ops, and the calibration statistics they need."""

from __future__ import annotations

from .base import LinearResult, Method
from .magnitude import Magnitude
from .obc import OBC
from .sparsegpt import SparseGPT
from .stats import HessianStats, NormStats
from .wanda import Wanda

METHODS = {"sparsegpt": SparseGPT, "obc": OBC, "wanda": Wanda, "magnitude": Magnitude}

# Options each Hessian method takes; make_method refuses the others when they are set.
_OBC_OPTIONS = ("percdamp", "max_damp_tries", "hessian_dtype")


def make_method(name: str, *, progress: bool = True, **options) -> Method:
    """Build a method by name; options a method does not take are refused only when set (not None/0).

    progress: whether a method that shows its own progress bars (OBC, on large layers) shows them.
    """
    try:
        cls = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None
    if cls is SparseGPT:
        return cls(**{k: v for k, v in options.items() if v is not None})
    taken = _OBC_OPTIONS if cls is OBC else ()
    extra = sorted(k for k, v in options.items() if v and k not in taken)
    if extra:
        hint = "SparseGPT-only options; OBC takes percdamp and hessian_dtype" if cls is OBC else "SparseGPT options"
        raise ValueError(f"method {name!r} does not take {', '.join(extra)} (those are {hint})")
    if cls is OBC:
        return cls(**{k: v for k, v in options.items() if v is not None}, progress=progress)
    return cls()


__all__ = ["METHODS", "OBC", "HessianStats", "LinearResult", "Magnitude", "Method", "NormStats", "SparseGPT",
           "Wanda", "make_method"]
