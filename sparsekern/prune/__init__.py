"""Pruning algorithms over the public ops, and the calibration statistics they need."""

from __future__ import annotations

from .base import LinearResult, Method
from .magnitude import Magnitude
from .sparsegpt import SparseGPT
from .stats import HessianStats, NormStats
from .wanda import Wanda

METHODS = {"sparsegpt": SparseGPT, "wanda": Wanda, "magnitude": Magnitude}


def make_method(name: str, **options) -> Method:
    """Build a method by name; options a method does not take are refused only when set (not None/0)."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None
    if cls is SparseGPT:
        return cls(**{k: v for k, v in options.items() if v is not None})
    extra = sorted(k for k, v in options.items() if v)
    if extra:
        raise ValueError(f"method {name!r} does not take {', '.join(extra)} (those are SparseGPT options)")
    return cls()


__all__ = ["METHODS", "HessianStats", "LinearResult", "Magnitude", "Method", "NormStats", "SparseGPT", "Wanda",
           "make_method"]
