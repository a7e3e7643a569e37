"""The public op layer: ``torch.library`` custom ops ``sparsekern::<name>``, with fake (meta) implementations.

Other libraries call these on their own tensors; the pruning algorithms in ``sparsekern.prune`` call nothing
else. Each op dispatches by backend (``sparsekern.backend``) to a compiled or interpreted Triton kernel, a native
op, or the pure-PyTorch reference in ``sparsekern.reference``. ``_KERNEL_MODULES`` names the module of
``sparsekern`` that holds each op's launcher (same name, same signature as the reference): a module of
``triton_kernels``, or for the whole-layer ``sparsegpt_prune`` the production loop that drives those kernels
(``prune.sparsegpt_loop``; kernel modules import nothing from above them). It is imported on first use, so Triton
is only loaded once a kernel backend is chosen. An op with no kernel, or a tensor the active backend cannot run on
(another device; fp64 for the SparseGPT kernels), runs the reference. The Cholesky family (hinv_cholesky, cholesky_update,
cholesky_delete) is native C++/CUDA from ``sparsekern._C`` on every backend when it is built, else the reference.

Conventions: weights are [rows, cols] = [out_features, in_features]; masks are bool, True where pruned; N:M
arguments are ``prune_n`` zeros in every ``prune_m`` consecutive inputs (``prune_n = 0``: unstructured).
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable

import torch

from . import _native, reference
from .backend import backend_for
from .reference import NotPositiveDefiniteError

# op name -> module of sparsekern with a launcher of that name (the reference's signature).
_KERNEL_MODULES: dict[str, str] = {
    "nm_mask": "triton_kernels.wanda",
    "wanda_prune": "triton_kernels.wanda",
    "magnitude_prune": "triton_kernels.select",
    "topk_mask": "triton_kernels.select",
    "hessian_update": "triton_kernels.stats",
    "sumsq_update": "triton_kernels.stats",
    "sparsegpt_sweep": "triton_kernels.sparsegpt_sweep",
    "sparsegpt_prune": "prune.sparsegpt_loop",
    "compress_24": "triton_kernels.sparse24",
    "decompress_24": "triton_kernels.sparse24",
    "sparse24_linear": "triton_kernels.sparse24_gemm",
    "compress_bitmap": "triton_kernels.bitmap",
    "decompress_bitmap": "triton_kernels.bitmap",
    "bitmap_linear": "triton_kernels.bitmap_gemm",
}
# ops whose kernels take fp32/fp16/bf16 only (an fp64 tensor runs the reference)
_NO_FP64_KERNEL = frozenset({"sparsegpt_sweep", "sparsegpt_prune"})


def _implementation(op: str, tensor: torch.Tensor) -> Callable:
    """The launcher that runs ``op`` on ``tensor``'s device under the active backend, else the reference."""
    backend = backend_for(tensor)
    if op not in _KERNEL_MODULES or backend == "torch" or (op in _NO_FP64_KERNEL and tensor.dtype == torch.float64):
        return getattr(reference, op)
    launcher = getattr(importlib.import_module(f"sparsekern.{_KERNEL_MODULES[op]}"), op)
    if backend == "cuda" and tensor.device.index not in (None, torch.cuda.current_device()):
        # Triton launches on the current device; make it the tensor's (e.g. a layer pruned on cuda:1).
        return functools.partial(_on_device, launcher, tensor.device)
    return launcher


def _on_device(launcher: Callable, device: torch.device, *args):
    with torch.cuda.device(device):
        return launcher(*args)


# -- masks -------------------------------------------------------------------------------------------------


@torch.library.custom_op("sparsekern::nm_mask", mutates_args=())
def nm_mask(scores: torch.Tensor, prune_n: int, prune_m: int) -> torch.Tensor:
    """Bool mask [rows, cols] marking the prune_n lowest of every prune_m consecutive scores of each row."""
    _check_nm(scores, prune_n, prune_m, "scores")
    return _implementation("nm_mask", scores)(scores, prune_n, prune_m)


@nm_mask.register_fake
def _(scores, prune_n, prune_m):
    return torch.empty_like(scores, dtype=torch.bool)


@torch.library.custom_op("sparsekern::topk_mask", mutates_args=())
def topk_mask(scores: torch.Tensor, sparsity: float, prune_n: int, prune_m: int, per_row: bool) -> torch.Tensor:
    """Bool mask [rows, cols], True where pruned: everything but the highest scores. N:M (prune_n > 0): the
    prune_n lowest of every prune_m consecutive scores of a row; else the round(sparsity * cols) lowest of each row
    (per_row) or the round(sparsity * rows * cols) lowest of the whole tensor. scores fp32/fp16/bf16, non-negative
    and finite: a score-based method computes its score and lets this op select (ties broken by position)."""
    _check_pattern(scores, sparsity, prune_n, prune_m, "scores")
    if scores.numel() and not (scores >= 0).all():  # also catches NaN; the selections order bit patterns
        raise ValueError("scores must be non-negative and not NaN (e.g. |W| * ||X||, not a signed quantity)")
    return _implementation("topk_mask", scores)(scores, sparsity, prune_n, prune_m, per_row)


@topk_mask.register_fake
def _(scores, sparsity, prune_n, prune_m, per_row):
    return torch.empty_like(scores, dtype=torch.bool)


# -- Wanda and magnitude ------------------------------------------------------------------------------------


@torch.library.custom_op("sparsekern::wanda_prune", mutates_args=("weight",))
def wanda_prune(
    weight: torch.Tensor, act_norm: torch.Tensor, sparsity: float, prune_n: int, prune_m: int
) -> torch.Tensor:
    """Zero, in place, the lowest |W_ij| * act_norm_j of each row (unstructured) or of every prune_m inputs
    (N:M); return the bool mask. weight [rows, cols] fp32/fp16/bf16; act_norm [cols] (L2 norm per input)."""
    _check_pattern(weight, sparsity, prune_n, prune_m)
    if act_norm.shape != (weight.shape[1],):
        raise ValueError(f"act_norm has shape {tuple(act_norm.shape)}, expected ({weight.shape[1]},)")
    return _implementation("wanda_prune", weight)(weight, act_norm, sparsity, prune_n, prune_m)


@wanda_prune.register_fake
def _(weight, act_norm, sparsity, prune_n, prune_m):
    return torch.empty_like(weight, dtype=torch.bool)


@torch.library.custom_op("sparsekern::magnitude_prune", mutates_args=("weight",))
def magnitude_prune(weight: torch.Tensor, sparsity: float, prune_n: int, prune_m: int) -> torch.Tensor:
    """Zero, in place, the smallest |W| of the whole matrix (unstructured) or of every prune_m inputs (N:M);
    return the bool mask."""
    _check_pattern(weight, sparsity, prune_n, prune_m)
    return _implementation("magnitude_prune", weight)(weight, sparsity, prune_n, prune_m)


@magnitude_prune.register_fake
def _(weight, sparsity, prune_n, prune_m):
    return torch.empty_like(weight, dtype=torch.bool)


# -- calibration statistics ---------------------------------------------------------------------------------


@torch.library.custom_op("sparsekern::hessian_update", mutates_args=("hessian",))
def hessian_update(hessian: torch.Tensor, x: torch.Tensor, count: int) -> None:
    """H <- (count * H + 2 X^T X) / (count + m) in place; hessian [k, k] fp32, x [..., k] (m = rows of x)."""
    _implementation("hessian_update", hessian)(hessian, x, count)


@hessian_update.register_fake
def _(hessian, x, count):
    return None


@torch.library.custom_op("sparsekern::sumsq_update", mutates_args=("sumsq",))
def sumsq_update(sumsq: torch.Tensor, x: torch.Tensor, count: int) -> None:
    """Running per-channel mean of squares in place: sumsq [k] fp32, x [..., k]."""
    _implementation("sumsq_update", sumsq)(sumsq, x, count)


@sumsq_update.register_fake
def _(sumsq, x, count):
    return None


# -- SparseGPT ----------------------------------------------------------------------------------------------


@torch.library.custom_op("sparsekern::sparsegpt_sweep", mutates_args=("scale", "zero"))
def sparsegpt_sweep(
    block: torch.Tensor,
    hinv_block: torch.Tensor,
    prune_mask: torch.Tensor | None,
    prune_n: int,
    prune_m: int,
    bits: int,
    scale: torch.Tensor | None,
    zero: torch.Tensor | None,
    groupsize: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SparseGPT's OBS sweep over one block of columns: (q [rows, B] fp32, err [rows, B] fp32, loss [rows] fp32,
    mask [rows, B] bool).

    block [rows, B] fp32/fp16/bf16 (B <= 256 on the kernel backends), lazy updates already applied; hinv_block
    [B, B], the block's diagonal tile of U; prune_mask [rows, B] bool, the block's unstructured mask, or None for
    N:M (chosen every prune_m columns from w^2/d^2) or no pruning. bits = 0: no quantization (scale, zero
    unused). Otherwise scale, zero [rows, G] fp32: groupsize = 0 takes the given grid (G = 1); groupsize > 0
    computes group g's grid when the sweep reaches column g * groupsize and writes it there (G = ceil(B /
    groupsize)). The caller applies ``W[:, right] -= err @ U[block, right]`` afterwards.
    """
    if block.dim() != 2 or hinv_block.shape != (block.shape[1],) * 2:
        raise ValueError(f"block {tuple(block.shape)} and hinv_block {tuple(hinv_block.shape)} must be [rows, B] "
                         "and [B, B]")
    if prune_n:
        _check_nm(block, prune_n, prune_m, "block")
    elif prune_mask is not None and prune_mask.shape != block.shape:
        raise ValueError(f"prune_mask has shape {tuple(prune_mask.shape)}, expected {tuple(block.shape)}")
    if bits and (scale is None or zero is None):
        raise ValueError("bits > 0 needs scale and zero tensors [rows, G]")
    return _implementation("sparsegpt_sweep", block)(
        block, hinv_block, prune_mask, prune_n, prune_m, bits, scale, zero, groupsize
    )


@sparsegpt_sweep.register_fake
def _(block, hinv_block, prune_mask, prune_n, prune_m, bits, scale, zero, groupsize):
    rows, width = block.shape
    dtype = reference.sparsegpt.compute_dtype(block.dtype)
    return (
        block.new_empty((rows, width), dtype=dtype),
        block.new_empty((rows, width), dtype=dtype),
        block.new_empty((rows,), dtype=dtype),
        block.new_empty((rows, width), dtype=torch.bool),
    )


@torch.library.custom_op("sparsekern::sparsegpt_prune", mutates_args=())
def sparsegpt_prune(
    weight: torch.Tensor,
    hinv_upper: torch.Tensor,
    sparsity: float,
    prune_n: int,
    prune_m: int,
    blocksize: int,
    bits: int,
    groupsize: int,
    lazy_precision: str = "ieee",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SparseGPT on one layer: (pruned weight [rows, cols] fp32, loss [rows], scale [rows, G], zero [rows, G]).

    weight [rows, cols] any float dtype; hinv_upper [cols, cols] from ``hinv_cholesky``. bits = 0 disables
    quantization (G = 0); otherwise G = 1, or ceil(cols / groupsize) with a group size. lazy_precision: the
    lazy update GEMM's operands, "ieee" (fp32) or "tf32" (tensor cores; emulated by rounding on the reference).
    """
    _check_pattern(weight, sparsity, prune_n, prune_m)
    reference.sparsegpt.check_blocking(blocksize, prune_m, bits, groupsize)
    if hinv_upper.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"hinv_upper has shape {tuple(hinv_upper.shape)}, expected {(weight.shape[1],) * 2}")
    if lazy_precision not in reference.sparsegpt.LAZY_PRECISIONS:
        raise ValueError(f"lazy_precision {lazy_precision!r} is not one of {reference.sparsegpt.LAZY_PRECISIONS}")
    return _implementation("sparsegpt_prune", weight)(
        weight, hinv_upper, sparsity, prune_n, prune_m, blocksize, bits, groupsize, lazy_precision
    )


@sparsegpt_prune.register_fake
def _(weight, hinv_upper, sparsity, prune_n, prune_m, blocksize, bits, groupsize, lazy_precision="ieee"):
    rows, cols = weight.shape
    dtype = reference.sparsegpt.compute_dtype(weight.dtype)
    groups = 0 if not bits else (1 if not groupsize else -(-cols // groupsize))
    return (
        weight.new_empty((rows, cols), dtype=dtype),
        weight.new_empty((rows,), dtype=dtype),
        weight.new_empty((rows, groups), dtype=dtype),
        weight.new_empty((rows, groups), dtype=dtype),
    )


@torch.library.custom_op("sparsekern::lsq_refit", mutates_args=())
def lsq_refit(dense: torch.Tensor, start: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor,
              iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares refit of the kept weights on a fixed mask: (weight [rows, cols] fp32, loss [rows]).

    Per row, the kept weights v minimizing (w - v) H (w - v)ᵀ with v = 0 where ``mask`` (True where pruned), by at
    most ``iters`` Jacobi-preconditioned CG iterations from ``start`` (e.g. the pruning method's weights); loss is
    (w - v) H (w - v)ᵀ / 2. dense, start [rows, cols] any float dtype; hessian [cols, cols] symmetric positive
    definite (damped). One GEMM per iteration (cuBLAS on a GPU), so every backend runs the reference.
    """
    _check_pattern(dense, 0.0, 0, 0, "dense")
    for name, tensor in (("start", start), ("mask", mask)):
        if tensor.shape != dense.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected the dense weight's {tuple(dense.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool (True where pruned), got {mask.dtype}")
    if hessian.shape != (dense.shape[1], dense.shape[1]):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected {(dense.shape[1],) * 2}")
    if iters < 0:
        raise ValueError(f"iters must be 0 or positive, got {iters}")
    return _implementation("lsq_refit", dense)(dense, start, hessian, mask, iters)


@lsq_refit.register_fake
def _(dense, start, hessian, mask, iters):
    rows, cols = dense.shape
    return dense.new_empty((rows, cols), dtype=torch.float32), dense.new_empty((rows,), dtype=torch.float32)


# -- 2:4 compressed weights ---------------------------------------------------------------------------------


@torch.library.custom_op("sparsekern::compress_24", mutates_args=())
def compress_24(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [N, K/2] in weight's dtype, meta [N, ceil(K/32)] int32) of a 2:4 weight [N, K] (fp32/fp16/bf16).

    Raises ValueError naming the first group of 4 with more than 2 nonzeros. Format: ``reference.sparse24``."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    reference.sparse24.check_24(weight)
    return _implementation("compress_24", weight)(weight)


@compress_24.register_fake
def _(weight):
    rows, cols = weight.shape
    return weight.new_empty((rows, cols // 2)), weight.new_empty((rows, -(-cols // 32)), dtype=torch.int32)


@torch.library.custom_op("sparsekern::decompress_24", mutates_args=())
def decompress_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The dense weight [N, 2 * values.shape[1]] of a compressed 2:4 weight (exact round trip)."""
    _check_compressed(values, meta)
    return _implementation("decompress_24", values)(values, meta)


@decompress_24.register_fake
def _(values, meta):
    return values.new_empty((values.shape[0], 2 * values.shape[1]))


@torch.library.custom_op("sparsekern::sparse24_linear", mutates_args=())
def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                    bias: torch.Tensor | None = None, perm: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias for a compressed 2:4 weight W [N, K]: x [..., K] fp16/bf16/fp32 (fp32 accumulation),
    y [..., N] in x's dtype; bias [N] or None. perm [K] int32/int64 or None: W is stored in permuted input order
    (channel permutation, ``sparsekern.permute``) and y = x[..., perm] @ W^T + bias, the kernels gathering x's
    columns as they load them. perm must be a permutation of 0..K-1; its values are not checked here (a per-call
    check would synchronize with the GPU): ``SparseLinear`` checks its perm once."""
    _check_compressed(values, meta)
    if x.dim() == 0 or x.shape[-1] != 2 * values.shape[1]:
        raise ValueError(f"x has shape {tuple(x.shape)}, but the weight takes {2 * values.shape[1]} features")
    if bias is not None and bias.shape != (values.shape[0],):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({values.shape[0]},)")
    if perm is not None and (perm.dtype not in (torch.int32, torch.int64) or perm.shape != (x.shape[-1],)):
        raise ValueError(f"perm must be int32 or int64 [{x.shape[-1]}], got {perm.dtype} {tuple(perm.shape)}")
    if perm is not None and perm.device != x.device:
        raise ValueError(f"perm is on {perm.device} but x is on {x.device}")
    return _implementation("sparse24_linear", x)(x, values, meta, bias, perm)


@sparse24_linear.register_fake
def _(x, values, meta, bias=None, perm=None):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


def _check_compressed(values: torch.Tensor, meta: torch.Tensor) -> None:
    if values.dim() != 2 or values.shape[1] % 2:
        raise ValueError(f"values must be [N, K/2] with K a multiple of 4, got shape {tuple(values.shape)}")
    words = -(-values.shape[1] // 16)
    if meta.dtype != torch.int32 or meta.shape != (values.shape[0], words):
        raise ValueError(f"meta must be int32 [{values.shape[0]}, {words}], got {meta.dtype} {tuple(meta.shape)}")


# -- bitmap compressed weights ------------------------------------------------------------------------------


@torch.library.custom_op("sparsekern::compress_bitmap", mutates_args=())
def compress_bitmap(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values [nnz] in weight's dtype, bitmap [N, ceil(K/32)] int32, offsets [N, ceil(K/128)] int32) of any weight
    [N, K] of a float dtype: every entry whose bits are not +0.0's is kept (-0.0, NaN and inf bit for bit). Format:
    ``reference.bitmap``. nnz depends on the data (the kernels read it back: one GPU sync); ValueError when nnz
    reaches 2**31."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be a float tensor, got {weight.dtype}")
    return _implementation("compress_bitmap", weight)(weight)


@compress_bitmap.register_fake
def _(weight):
    rows, cols = weight.shape
    nnz = torch.library.get_ctx().new_dynamic_size()
    return (weight.new_empty((nnz,)), weight.new_empty((rows, -(-cols // reference.bitmap.WORD)), dtype=torch.int32),
            weight.new_empty((rows, -(-cols // reference.bitmap.TILE)), dtype=torch.int32))


@torch.library.custom_op("sparsekern::decompress_bitmap", mutates_args=())
def decompress_bitmap(values: torch.Tensor, bitmap: torch.Tensor, offsets: torch.Tensor,
                      in_features: int) -> torch.Tensor:
    """The dense weight [N, in_features] in values' dtype of a bitmap-compressed weight (exact round trip: +0.0
    where nothing is kept)."""
    _check_bitmap(values, bitmap, offsets, in_features)
    return _implementation("decompress_bitmap", values)(values, bitmap, offsets, in_features)


@decompress_bitmap.register_fake
def _(values, bitmap, offsets, in_features):
    return values.new_empty((bitmap.shape[0], in_features))


@torch.library.custom_op("sparsekern::bitmap_linear", mutates_args=())
def bitmap_linear(x: torch.Tensor, values: torch.Tensor, bitmap: torch.Tensor, offsets: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias for a bitmap-compressed weight W [N, K] (K = x.shape[-1]): x [..., K] fp16/bf16/fp32
    (fp32 accumulation), y [..., N] in x's dtype; bias [N] or None. Shapes are checked here; the contents (nnz
    and offsets consistent with the bitmap) are not: that would synchronize with the GPU on every call."""
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension [..., K], got a scalar")
    _check_bitmap(values, bitmap, offsets, x.shape[-1], "x.shape[-1]")
    if bias is not None and bias.shape != (bitmap.shape[0],):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({bitmap.shape[0]},) (out_features)")
    return _implementation("bitmap_linear", x)(x, values, bitmap, offsets, bias)


@bitmap_linear.register_fake
def _(x, values, bitmap, offsets, bias=None):
    return x.new_empty((*x.shape[:-1], bitmap.shape[0]))


def _check_bitmap(values: torch.Tensor, bitmap: torch.Tensor, offsets: torch.Tensor, in_features: int,
                  source: str = "in_features") -> None:
    """Shapes and dtypes of a bitmap-compressed weight with ``in_features`` inputs (named ``source`` in errors)."""
    if values.dim() != 1 or not values.is_floating_point():
        raise ValueError(f"values must be a 1-D float tensor [nnz], got {values.dtype} {tuple(values.shape)}")
    if bitmap.dtype != torch.int32 or bitmap.dim() != 2:
        raise ValueError(f"bitmap must be int32 [N, ceil(K/32)], got {bitmap.dtype} {tuple(bitmap.shape)}")
    words = -(-in_features // reference.bitmap.WORD)
    if bitmap.shape[1] != words:
        raise ValueError(f"bitmap has shape {tuple(bitmap.shape)}, expected ({bitmap.shape[0]}, {words}) for "
                         f"{source} = {in_features} (ceil(K/32) words a row)")
    tiles = -(-in_features // reference.bitmap.TILE)
    if offsets.dtype != torch.int32 or offsets.shape != (bitmap.shape[0], tiles):
        raise ValueError(f"offsets must be int32 ({bitmap.shape[0]}, {tiles}) for {bitmap.shape[0]} rows and "
                         f"{source} = {in_features} (ceil(K/128) a row), got {offsets.dtype} {tuple(offsets.shape)}")


# -- the Cholesky family: native C++/CUDA (sparsekern._C), else the reference under the same schemas --------

# Schemas of the ops csrc/registration.cpp defines; kept here too so that the fallback registers the same ones.
_CHOLESKY_SCHEMAS = {
    "hinv_cholesky": "hinv_cholesky(Tensor hessian, float percdamp, int max_tries) -> (Tensor, Tensor)",
    "hinv_cholesky_": "hinv_cholesky_(Tensor(a!) hessian, float percdamp, int max_tries) -> Tensor",
    "cholesky_update": "cholesky_update(Tensor upper, Tensor x, bool downdate) -> Tensor",
    "cholesky_delete": "cholesky_delete(Tensor upper, Tensor index) -> (Tensor, Tensor)",
}

NATIVE = _native.load()  # True when sparsekern._C registered the Cholesky ops
# Per op, the dispatch keys _C serves natively ("CPU"; "CUDA" for all four only when _C was built with nvcc);
# read before the fallback below fills the rest with the reference.
NATIVE_KEYS = {name: tuple(key for key in ("CPU", "CUDA") if NATIVE and torch._C._dispatch_has_kernel_for_dispatch_key(
    f"sparsekern::{name}", key)) for name in _CHOLESKY_SCHEMAS}


def _reference_hinv_cholesky_(hessian, percdamp, max_tries):
    upper, damp = reference.hinv_cholesky(hessian, percdamp, max_tries)
    hessian.copy_(upper)
    return damp


# Without _C the schemas are defined here over the reference; with a _C built without CUDA (no toolkit at build
# time), CUDA tensors get the reference too.
_python_kernels = torch.library.Library("sparsekern", "FRAGMENT")
for _name, _schema in _CHOLESKY_SCHEMAS.items():
    if not NATIVE:
        _python_kernels.define(_schema)
    for _key in ("CPU", "CUDA"):
        if _key not in NATIVE_KEYS[_name]:
            _python_kernels.impl(
                _name, _reference_hinv_cholesky_ if _name == "hinv_cholesky_" else getattr(reference, _name), _key)


@torch.library.register_fake("sparsekern::hinv_cholesky")
def _(hessian, percdamp, max_tries):
    return hessian.new_empty(hessian.shape), hessian.new_empty(())


@torch.library.register_fake("sparsekern::hinv_cholesky_")
def _(hessian, percdamp, max_tries):
    return hessian.new_empty(())


@torch.library.register_fake("sparsekern::cholesky_update")
def _(upper, x, downdate):
    return upper.new_empty(upper.shape)


@torch.library.register_fake("sparsekern::cholesky_delete")
def _(upper, index):
    n = upper.shape[-1]
    return upper.new_empty((*upper.shape[:-2], n - 1, n - 1)), upper.new_empty((*upper.shape[:-2], n))


def _linalg_errors(call: Callable, *args):
    """Run a Cholesky op; the native ops raise torch.linalg.LinAlgError, which becomes NotPositiveDefiniteError."""
    try:
        return call(*args)
    except NotPositiveDefiniteError:
        raise
    except torch.linalg.LinAlgError as exc:
        raise NotPositiveDefiniteError(str(exc)) from None


def _check_square(hessian: torch.Tensor) -> None:
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian must be square, got shape {tuple(hessian.shape)}")
    if hessian.dtype not in reference.cholesky.FLOAT_DTYPES:
        raise ValueError(f"hessian must be float32 or float64, got {hessian.dtype}")


def hinv_cholesky(hessian: torch.Tensor, percdamp: float = 0.01, max_tries: int = 4
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, damp): U upper triangular with U^T U = (H + damp I)^-1, for SparseGPT's and OBC's OBS updates.

    Inputs never seen (zero diagonal) get a unit diagonal; damp = percdamp * mean(diag H), x10 after each failed
    factorization, at most ``max_tries`` attempts, then NotPositiveDefiniteError. hessian [n, n] fp32/fp64 is
    left unchanged (see :func:`hinv_cholesky_` to reuse its memory). The native op needs one factorization and
    one triangular inverse (the index-reversal identity) where the reference makes three O(n^3) calls.
    """
    _check_square(hessian)
    return _linalg_errors(torch.ops.sparsekern.hinv_cholesky, hessian, percdamp, max_tries)


def hinv_cholesky_(hessian: torch.Tensor, percdamp: float = 0.01, max_tries: int = 4) -> torch.Tensor:
    """In-place :func:`hinv_cholesky`: overwrites ``hessian`` (contiguous) with U and returns damp. The native
    op then needs no second n x n buffer."""
    _check_square(hessian)
    if not hessian.is_contiguous():
        raise ValueError("hinv_cholesky_ needs a contiguous hessian (it is overwritten with U)")
    return _linalg_errors(torch.ops.sparsekern.hinv_cholesky_, hessian, percdamp, max_tries)


def cholesky_update(upper: torch.Tensor, x: torch.Tensor, downdate: bool = False) -> torch.Tensor:
    """R' with R'^T R' = R^T R + X^T X (downdate=True: - X^T X), by Givens rotations in O(k n^2).

    upper [..., n, n] upper triangular (only that triangle is read), x [..., k, n]; fp32 or fp64. A downdate
    that would make the matrix indefinite raises NotPositiveDefiniteError naming the batch entry and column.
    """
    return _linalg_errors(torch.ops.sparsekern.cholesky_update, upper, x, downdate)


def cholesky_delete(upper: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove variable ``index[b]`` from each upper factor by Givens rotations: (R' [..., n-1, n-1], dropped [..., n]).

    For R the upper factor of H^-1, R' is the upper factor of (H without that input)^-1 and dropped * dropped[q]
    is row q of H^-1: exact OBS elimination (see ``reference.cholesky.cholesky_delete``). index: int64 [...].
    """
    return torch.ops.sparsekern.cholesky_delete(upper, index)


# -- argument checks shared by the ops ----------------------------------------------------------------------


def _check_nm(tensor: torch.Tensor, prune_n: int, prune_m: int, what: str) -> None:
    if tensor.dim() != 2:
        raise ValueError(f"{what} must be 2-D [rows, cols], got shape {tuple(tensor.shape)}")
    if not 0 < prune_n < prune_m:
        raise ValueError(f"N:M needs 0 < N < M, got {prune_n}:{prune_m}")
    if tensor.shape[1] % prune_m:
        raise ValueError(f"{what} has {tensor.shape[1]} columns, not divisible by M={prune_m}")


def _check_pattern(weight: torch.Tensor, sparsity: float, prune_n: int, prune_m: int, what: str = "weight") -> None:
    if prune_n:
        _check_nm(weight, prune_n, prune_m, what)
    elif weight.dim() != 2:
        raise ValueError(f"{what} must be 2-D [rows, cols], got shape {tuple(weight.shape)}")
    elif not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity} is outside [0, 1)")
