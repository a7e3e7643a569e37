"""2:4 linear-layer benchmark, shared by ``sparsekern bench`` and ``benchmarks/bench_gemm.py``.

For each (N, K) weight shape, dtype and batch size M it times y = x W^T with: dense ``F.linear`` (cuBLAS), dense
under ``torch.compile``, PyTorch's semi-structured 2:4 tensor (cuSPARSELt and CUTLASS, where this PyTorch build
has them), the sparsekern Triton kernel (``triton``), the layer's dense fallback on the weight decompressed per
call (``dense_decompress``) and ``SparseLinear`` itself (``dispatched``). From the measured medians it derives the
dispatch rules (the fastest of triton / dense / semi_structured per M) that ``SparseLinear`` ships with.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Callable

import torch

from . import ops
from .nn import dispatch
from .nn.sparse_linear import SparseLinear
from .reference.masks import nm_mask

M_VALUES = (1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 8192)
SHAPES = {  # (N, K) = (out_features, in_features) of LLaMA linears
    "7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "13b": [(5120, 5120), (13824, 5120), (5120, 13824)],
    "70b": [(8192, 8192), (28672, 8192), (8192, 28672)],
    "tiny": [(40, 64)],
}
# The implementations the dispatch table chooses among, by their benchmark names.
DISPATCHABLE = {"triton": "triton", "dense_decompress": "dense", "cusparselt": "semi_structured",
                "cutlass": "semi_structured"}


def time_ms(fn: Callable[[], object], device: torch.device, repeat: int = 20) -> dict:
    """Median and 20/80% quantiles in ms: CUDA events over many calls on a GPU (``triton.testing.do_bench``),
    wall time on a CPU."""
    if device.type == "cuda":
        import triton.testing

        median, low, high = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
        return {"median_ms": median, "p20_ms": low, "p80_ms": high}
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    quantiles = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
    return {"median_ms": statistics.median(times), "p20_ms": quantiles[0], "p80_ms": quantiles[-1]}


def implementations(weight: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """name -> fn(x) for every implementation available here, all computing x @ weight^T (weight 2:4)."""
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    layer = SparseLinear.from_dense(linear)
    values, meta = layer.values, layer.meta
    impls = {
        "dense": lambda x: torch.nn.functional.linear(x, weight),
        "triton": lambda x: ops.sparse24_linear(x, values, meta, None),
        "dense_decompress": lambda x: torch.nn.functional.linear(x, ops.decompress_24(values, meta)),
        "dispatched": layer,
    }
    if weight.is_cuda:
        impls["dense_compiled"] = torch.compile(lambda x: torch.nn.functional.linear(x, weight))
        impls.update(_semi_structured(weight))
    return impls


def _semi_structured(weight: torch.Tensor) -> dict:
    """PyTorch's 2:4 backends, each where this build and GPU support it."""
    try:
        from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured
    except ImportError:
        return {}
    impls = {}
    for name, force_cutlass in [("cusparselt", False), ("cutlass", True)]:
        previous = SparseSemiStructuredTensor._FORCE_CUTLASS
        try:
            SparseSemiStructuredTensor._FORCE_CUTLASS = force_cutlass
            sparse = to_sparse_semi_structured(weight)
            torch.nn.functional.linear(torch.zeros(32, weight.shape[1], device=weight.device, dtype=weight.dtype),
                                       sparse)
            impls[name] = lambda x, sparse=sparse: torch.nn.functional.linear(x, sparse)
        except (RuntimeError, ValueError, NotImplementedError):
            pass  # not built into this PyTorch, or not for this GPU / dtype / shape
        finally:
            SparseSemiStructuredTensor._FORCE_CUTLASS = previous
    return impls


def random_24(n: int, k: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.Tensor:
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)
    return weight.masked_fill(nm_mask(weight.abs().float(), 2, 4), 0)


def run_gemm(shapes, m_values, dtypes, device: torch.device, impls: set[str] | None = None,
             progress: Callable[[str], None] = print, repeat: int = 20) -> list[dict]:
    """Rows of {n, k, m, dtype, impl, median_ms, p20_ms, p80_ms, baseline, speedup}: the speedup is over dense
    cuBLAS measured in the same run. ``impls`` limits the implementations timed (dense always is); ``repeat``
    is the CPU's number of timed calls (the GPU times by CUDA events over 100 ms)."""
    rows = []
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for n, k in shapes:
        for dtype in dtypes:
            weight = random_24(n, k, dtype, device)
            available = implementations(weight)
            for m in m_values:
                # Semi-structured kernels want M padded to a multiple of 32/64 internally; x itself is [m, k].
                x = torch.randn(m, k, device=device, dtype=dtype)
                timings = {}
                for name, fn in available.items():
                    if impls and name not in impls and name != "dense":
                        continue
                    try:
                        timings[name] = time_ms(lambda fn=fn: fn(x), device, repeat)
                    except (RuntimeError, ValueError) as exc:  # e.g. a semi-structured backend refusing this M
                        progress(f"  {name} failed at M={m}: {str(exc).splitlines()[0][:120]}")
                dense = timings["dense"]["median_ms"]
                for name, timing in timings.items():
                    rows.append({"device": device_name, "n": n, "k": k, "m": m, "dtype": str(dtype).removeprefix("torch."), "impl": name,
                                 **timing, "baseline": "dense", "speedup": dense / timing["median_ms"]})
                best = min(timings, key=lambda name: timings[name]["median_ms"])
                progress(f"N={n:>6} K={k:>6} M={m:>5} {str(dtype).removeprefix('torch.'):<9} dense "
                         f"{dense * 1e3:8.1f} us  " + "  ".join(
                             f"{name} x{dense / t['median_ms']:.2f}" for name, t in timings.items()
                             if name != "dense") + f"  (best: {best})")
    return rows


def crossover_rules(rows: list[dict]) -> list[dict]:
    """Dispatch-table entries: per (device, dtype, N, K), the fastest dispatchable implementation at each
    measured M, merged into [[max_m, impl], ...] runs with the last open-ended."""
    cases: dict[tuple, dict[int, tuple[float, str]]] = {}
    for row in rows:
        impl = DISPATCHABLE.get(row["impl"])
        if impl is None:
            continue
        key = (row["device"], row["dtype"], int(row["n"]), int(row["k"]))
        m, median = int(row["m"]), float(row["median_ms"])
        best = cases.setdefault(key, {}).get(m)
        if best is None or median < best[0]:
            cases[key][m] = (median, impl)
    entries = []
    for (device, dtype, n, k), by_m in sorted(cases.items()):
        rules = []
        for m in sorted(by_m):
            impl = by_m[m][1]
            if rules and rules[-1][1] == impl:
                rules[-1][0] = m
            else:
                rules.append([m, impl])
        rules[-1][0] = None
        entries.append({"device": device, "dtype": dtype, "n": n, "k": k, "rules": rules})
    return entries


def write_table(entries: list[dict], path=None) -> None:
    """Merge entries into the dispatch table (same device/dtype/shape replaced), atomically."""
    path = path or dispatch.TABLE
    table = json.loads(path.read_text()) if path.exists() else {"entries": []}
    keys = {(e["device"], e["dtype"], e["n"], e["k"]) for e in entries}
    table["entries"] = [e for e in table["entries"] if (e["device"], e["dtype"], e["n"], e["k"]) not in keys]
    table["entries"] += entries
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    tmp.replace(path)
    dispatch._table.cache_clear()
    dispatch._cuda_rules.cache_clear()
