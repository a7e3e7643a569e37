"""Which implementation a compressed linear layer runs at a given batch size: rules measured on this GPU by
``sparsekern bench --write-table`` (or ``benchmarks/bench_gemm.py --write-table``) into the user's cache folder,
``cache_dir()/dispatch_table.json`` (``$SPARSEKERN_CACHE``, default ``~/.cache/sparsekern``), never the package.

For each (GPU name, format, dtype, N, K, sparsity) the table lists rules [[max_m, impl], ..., [null, impl]]: the
first rule whose max_m >= M (rows of x) wins. ``sparsity`` is the bitmap layer's, to the nearest tenth (its
kernel's speed depends on it), and null for 2:4. Implementations:
- ``triton``: the format's kernel reading the compressed weight (``sparse24_linear``, ``bitmap_linear``);
- ``dense``: cuBLAS on the weight decompressed for the call (``decompress_*`` then ``F.linear``);
- ``semi_structured`` (2:4 only): PyTorch's 2:4 tensor (cuSPARSELt or CUTLASS), converted once and kept.
A channel-permuted 2:4 layer (``SparseLinear.perm``) follows the same rules: ``triton`` gathers x[..., perm] in its
loads, ``dense`` and ``semi_structured`` index_select x first. The table was measured without a perm.

A shape this GPU has not measured gets ``DEFAULT_RULES``, but only once the format's kernel has given the
reference's result on this GPU (a small check, run once per GPU, format and dtype); if it does not, ``dense``.
Either way sparsekern says so once per process, naming the GPU, the shape and the command that measures it. CPU
tensors run the reference (``dense``), or the Triton kernel under the interpreter backend (how the tests reach it).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch

from ..backend import get_backend

IMPLS = ("triton", "dense", "semi_structured")
# Unmeasured: decode (M <= 16) is bound by the weight read, where the compressed weight saves 40-60% of the
# bytes; larger M is compute-bound, where tensor-core cuBLAS on the decompressed weight wins.
DEFAULT_RULES = ((16, "triton"), (None, "dense"))
FALLBACK_RULES = ((None, "dense"),)
_warned: set[str] = set()


def table_path() -> Path:
    """The measured table's file in the user's cache folder."""
    from ..models import cache_dir

    return cache_dir() / "dispatch_table.json"


def sparsity_bucket(format: str, sparsity: float | None) -> float | None:
    """The table's sparsity key: the bitmap's sparsity to the nearest tenth, None for 2:4."""
    if format == "2:4" or sparsity in (None, ""):  # "": an empty CSV cell
        return None
    return round(round(float(sparsity) * 10) / 10, 1)


def entry_key(entry: dict) -> tuple:
    """(device, format, dtype, n, k, sparsity) of a table entry (entries without a format are 2:4)."""
    fmt = entry.get("format", "2:4")
    return (entry["device"], fmt, entry["dtype"], int(entry["n"]), int(entry["k"]),
            sparsity_bucket(fmt, entry.get("sparsity")))


@functools.lru_cache(maxsize=None)
def _table() -> dict:
    path = table_path()
    if not path.exists():
        return {}
    try:
        entries = json.loads(path.read_text())["entries"]
        return {entry_key(e): tuple(tuple(rule) for rule in e["rules"]) for e in entries}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _say_once(f"table:{path}", f"sparsekern: the dispatch table {path} cannot be read ({exc}); using the "
                                   "defaults. Rewrite it with `sparsekern bench --write-table`.")
        return {}


@torch.compiler.assume_constant_result  # a constant of the layer: torch.compile does not trace the lookup
def rules_for(device: torch.device, format: str, dtype: torch.dtype, n: int, k: int,
              sparsity: float | None = None) -> tuple:
    """The (max_m, impl) rules for a layer of N outputs and K inputs in ``format`` on ``device``."""
    if device.type != "cuda":
        return ((None, "triton" if get_backend() == "interpret" else "dense"),)
    index = torch.cuda.current_device() if device.index is None else device.index
    return _cuda_rules(index, format, dtype, n, k, sparsity_bucket(format, sparsity))


@functools.lru_cache(maxsize=None)
def _cuda_rules(index: int, format: str, dtype: torch.dtype, n: int, k: int, bucket: float | None) -> tuple:
    """Looked up once per GPU and layer shape: every eager forward asks."""
    name = torch.cuda.get_device_name(index)
    dtype_name = str(dtype).removeprefix("torch.")
    measured = _table().get((name, format, dtype_name, n, k, bucket))
    if measured is not None:
        return measured
    shape = f"{format}{'' if bucket is None else f' at {bucket:.0%}'} {dtype_name} N={n} K={k}"
    if get_backend() == "cuda" and _kernel_checked(index, format, dtype):
        _say_once("unmeasured", f"sparsekern: dispatch for {shape} (and any other shape) is not measured on "
                                f"{name}: its kernel for M <= 16, dense cuBLAS above (the kernel was checked "
                                "against the reference on this GPU). Run `sparsekern bench --write-table` to "
                                "measure the fastest choice.")
        return DEFAULT_RULES
    _say_once("unchecked", f"sparsekern: the {format} kernel did not give the reference's result on {name} "
                           f"({dtype_name}), or the backend is not cuda: {shape} runs dense on the decompressed "
                           "weight. Run the GPU tests (make gpu-check) to see why.")
    return FALLBACK_RULES


@functools.lru_cache(maxsize=None)
def _kernel_checked(index: int, format: str, dtype: torch.dtype) -> bool:
    """Run the format's kernel once on a small random layer with odd sizes (decode and prefill rows) on GPU
    ``index`` and compare it with the decompressed weight through F.linear."""
    from .. import formats
    from ..reference.masks import nm_mask

    fmt = formats.get(format)
    device = torch.device("cuda", index)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(72, 200, generator=generator)
    pruned = nm_mask(weight.abs(), 2, 4) if format == "2:4" else torch.rand(72, 200, generator=generator) < 0.5
    weight = weight.masked_fill(pruned, 0).to(device=device, dtype=dtype)
    try:
        buffers = fmt.compress(weight, "check")
        for m in (3, 40):
            x = torch.randn(m, 200, generator=generator).to(device=device, dtype=dtype)
            got = fmt.linear(x, buffers, None, None).float()
            expected = x.float() @ fmt.decompress(buffers, 200).float().T
            if not torch.allclose(got, expected, atol=5e-2, rtol=2e-2):
                return False
    except Exception as exc:  # a compile error, a launch failure: the dense path still works
        print(f"sparsekern: the {format} kernel failed on cuda:{index}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return False
    return True


def _say_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        print(message, file=sys.stderr)


def clear_caches() -> None:
    """Forget the loaded table and the rules derived from it (after writing the table)."""
    _table.cache_clear()
    _cuda_rules.cache_clear()


def choose(rules: tuple, m: int) -> str:
    for max_m, impl in rules:
        if max_m is None or m <= max_m:
            return impl
    return rules[-1][1]
