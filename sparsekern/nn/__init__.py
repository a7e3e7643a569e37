"""Sparse inference: ``SparseLinear`` (pruned weights stored compressed, 2:4 or bitmap) and ``sparsify(model)``."""

from .sparse_linear import SparseLinear, is_24, sparsify, sparsify_like

__all__ = ["SparseLinear", "is_24", "sparsify", "sparsify_like"]
