"""Which implementation a 2:4 linear layer runs at a given batch size: a table measured by
``benchmarks/bench_gemm.py`` and shipped with the package (``dispatch_table.json``).

For each (GPU name, dtype, N, K) the table lists rules [[max_m, impl], ..., [null, impl]]: the first rule whose
max_m >= M (rows of x) wins. Implementations:
- ``triton``: ``sparsekern::sparse24_linear``, the compressed weight expanded on chip (fewer bytes read);
- ``dense``: cuBLAS on the weight decompressed for the call (``decompress_24`` then ``F.linear``);
- ``semi_structured``: PyTorch's 2:4 tensor (cuSPARSELt or CUTLASS), converted once and kept.
A channel-permuted layer (``SparseLinear.perm``) follows the same rules: ``triton`` gathers x[..., perm] in its
loads, ``dense`` and ``semi_structured`` index_select x first (their GEMMs take no gather). The table was measured
without a perm.
Shapes or GPUs the table has not measured use ``DEFAULT_RULES``. CPU tensors run the reference (``dense``), or the
Triton kernel under the interpreter backend (how the tests reach it).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from ..backend import get_backend

TABLE = Path(__file__).with_name("dispatch_table.json")
IMPLS = ("triton", "dense", "semi_structured")
# Unmeasured: decode (M <= 16) is bound by the weight read, where the compressed weight saves ~44% of the
# bytes; larger M is compute-bound, where tensor-core cuBLAS wins.
DEFAULT_RULES = ((16, "triton"), (None, "dense"))


@functools.lru_cache(maxsize=None)
def _table() -> dict:
    if not TABLE.exists():
        return {}
    entries = json.loads(TABLE.read_text())["entries"]
    return {(e["device"], e["dtype"], e["n"], e["k"]): tuple(tuple(rule) for rule in e["rules"]) for e in entries}


@torch.compiler.assume_constant_result  # a constant of the layer: torch.compile does not trace the lookup
def rules_for(device: torch.device, dtype: torch.dtype, n: int, k: int) -> tuple:
    """The (max_m, impl) rules for a layer of N outputs and K inputs on ``device``."""
    if device.type != "cuda":
        return ((None, "triton" if get_backend() == "interpret" else "dense"),)
    return _cuda_rules(torch.cuda.current_device() if device.index is None else device.index, dtype, n, k)


@functools.lru_cache(maxsize=None)
def _cuda_rules(index: int, dtype: torch.dtype, n: int, k: int) -> tuple:
    """Looked up once per GPU and layer shape: every eager forward asks."""
    name = torch.cuda.get_device_name(index)
    return _table().get((name, str(dtype).removeprefix("torch."), n, k), DEFAULT_RULES)


def choose(rules: tuple, m: int) -> str:
    for max_m, impl in rules:
        if max_m is None or m <= max_m:
            return impl
    return rules[-1][1]
