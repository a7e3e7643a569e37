"""Pure-PyTorch versions of every op: the test oracle and the CPU fallback. Masks are True where pruned."""

from . import cholesky
from .bitmap import bitmap_linear, compress_bitmap, decompress_bitmap
from .cholesky import cholesky_delete, cholesky_update
from .hessian import NotPositiveDefiniteError, hessian_update, hinv_cholesky, sumsq_update
from .lsq import lsq_refit
from .masks import nm_mask, prune_count, row_mask, tensor_mask, topk_mask
from .quant import minmax_params, quantize
from .sparse24 import compress_24, decompress_24, sparse24_linear
from .sparsegpt import sparsegpt_prune, sparsegpt_sweep
from .wanda import magnitude_prune, wanda_prune

__all__ = [
    "NotPositiveDefiniteError",
    "bitmap_linear",
    "cholesky_delete",
    "cholesky_update",
    "compress_24",
    "compress_bitmap",
    "decompress_24",
    "decompress_bitmap",
    "hessian_update",
    "hinv_cholesky",
    "lsq_refit",
    "magnitude_prune",
    "minmax_params",
    "nm_mask",
    "prune_count",
    "quantize",
    "row_mask",
    "sparse24_linear",
    "sparsegpt_prune",
    "sparsegpt_sweep",
    "sumsq_update",
    "tensor_mask",
    "topk_mask",
    "wanda_prune",
]
