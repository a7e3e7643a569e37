"""Sparse inference: ``SparseLinear`` (2:4 weights stored compressed) and ``sparsify(model)``."""

from .sparse_linear import SparseLinear, is_24, sparsify, sparsify_like

__all__ = ["SparseLinear", "is_24", "sparsify", "sparsify_like"]
