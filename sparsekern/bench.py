"""Compressed linear-layer benchmark (2:4 and bitmap), shared by ``sparsekern bench`` and
``benchmarks/bench_gemm.py``.

For each format, (N, K) weight shape, dtype and batch size M it times y = x W^T with: dense ``F.linear`` on the
masked-dense weight (cuBLAS, the baseline), dense under ``torch.compile``, the format's sparsekern Triton kernel
(``triton``: ``sparse24_linear`` or ``bitmap_linear``), the layer's dense fallback on the weight decompressed per
call (``dense_decompress``) and ``SparseLinear`` itself (``dispatched``); for 2:4 also PyTorch's semi-structured
2:4 tensor (cuSPARSELt and CUTLASS, where this PyTorch build has them). The 2:4 weight is random, pruned 2:4 by
magnitude (sparsity 0.5); a bitmap weight is random, pruned unstructured by magnitude to each of ``sparsities``
(the same fraction of every row). Every row carries its ``format`` and ``sparsity``. From the measured medians
:func:`crossover_rules` derives the dispatch rules (the fastest of triton / dense / semi_structured per M, per
format, shape, dtype and sparsity) that :func:`write_table` stores in the user's cache folder
(``sparsekern.nn.dispatch.table_path()``), where ``SparseLinear`` reads them.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from . import formats
from .nn import dispatch
from .nn.sparse_linear import SparseLinear
from .reference.masks import nm_mask, topk_mask

M_VALUES = (1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 8192)
SHAPES = {  # (N, K) = (out_features, in_features) of LLaMA linears
    "7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "13b": [(5120, 5120), (13824, 5120), (5120, 13824)],
    "70b": [(8192, 8192), (28672, 8192), (8192, 28672)],
    "tiny": [(40, 64)],
}
FORMATS = ("2:4", "bitmap")
BITMAP_SPARSITIES = (0.5, 0.6, 0.7, 0.8)
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


def implementations(weight: torch.Tensor, format: str = "2:4") -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """name -> fn(x) for every implementation available here, all computing x @ weight^T, with the weight (2:4,
    or any sparsity for "bitmap") stored in ``format``."""
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}: the benchmark knows {', '.join(FORMATS)}")
    layer = SparseLinear.from_dense(linear, format=format)
    fmt, compressed, k = formats.get(format), layer.compressed, layer.in_features
    impls = {
        "dense": lambda x: torch.nn.functional.linear(x, weight),
        "triton": lambda x: fmt.linear(x, compressed, None, None),  # the format's kernel op
        "dense_decompress": lambda x: torch.nn.functional.linear(x, fmt.decompress(compressed, k)),
        "dispatched": layer,
    }
    if weight.is_cuda:
        impls["dense_compiled"] = torch.compile(lambda x: torch.nn.functional.linear(x, weight))
        if format == "2:4":
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


def random_unstructured(n: int, k: int, sparsity: float, dtype: torch.dtype, device: torch.device,
                        seed: int = 0) -> torch.Tensor:
    """A random weight with the round(sparsity * k) smallest magnitudes of every row zeroed."""
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)
    return weight.masked_fill(topk_mask(weight.abs(), sparsity), 0)


def prune_by_magnitude(model: torch.nn.Module, pattern: str, filter_fn: Callable[[str], bool] | None = None) -> int:
    """Prune the decoder linears of ``model`` (names with ``.layers.``, or those ``filter_fn(name)`` picks) in
    place by magnitude, per row: ``pattern`` "N:M" (e.g. "2:4") or an unstructured sparsity ("0.5"). No
    calibration, quick: for benchmarks, where speed and size do not depend on which weights are kept. Returns the
    number of linears pruned."""
    if ":" in pattern:
        n, m = (int(part) for part in pattern.split(":"))
        select = lambda scores: topk_mask(scores, 0.0, n, m)  # noqa: E731
    else:
        sparsity = float(pattern)
        select = lambda scores: topk_mask(scores, sparsity)  # noqa: E731
    pruned = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if type(module) is torch.nn.Linear and (filter_fn(name) if filter_fn else ".layers." in name):
                module.weight.masked_fill_(select(module.weight.abs()), 0)
                pruned += 1
    return pruned


def gemm_cases(formats=FORMATS, sparsities=BITMAP_SPARSITIES) -> list[tuple[str, float]]:
    """(format, sparsity) pairs: 2:4 once (0.5), the bitmap at each of ``sparsities``."""
    cases = []
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}: the benchmark knows {', '.join(FORMATS)}")
        cases += [("2:4", 0.5)] if fmt == "2:4" else [("bitmap", float(s)) for s in sparsities]
    return cases


def run_gemm(shapes, m_values, dtypes, device: torch.device, impls: set[str] | None = None,
             progress: Callable[[str], None] = print, repeat: int = 20, formats=FORMATS,
             sparsities=BITMAP_SPARSITIES) -> list[dict]:
    """Rows of {format, sparsity, n, k, m, dtype, impl, median_ms, p20_ms, p80_ms, baseline, speedup}: the speedup
    is over dense cuBLAS on the same masked weight, measured in the same run. ``formats``: "2:4" (a 2:4 weight,
    sparsity 0.5) and/or "bitmap" (an unstructured weight at each of ``sparsities``). ``impls`` limits the
    implementations timed (dense always is); ``repeat`` is the CPU's number of timed calls (the GPU times by CUDA
    events over 100 ms)."""
    rows = []
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for fmt, sparsity in gemm_cases(formats, sparsities):
        for n, k in shapes:
            for dtype in dtypes:
                dtype_name = str(dtype).removeprefix("torch.")
                weight = (random_24(n, k, dtype, device) if fmt == "2:4"
                          else random_unstructured(n, k, sparsity, dtype, device))
                available = implementations(weight, fmt)
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
                        rows.append({"device": device_name, "format": fmt, "sparsity": sparsity, "n": n, "k": k,
                                     "m": m, "dtype": dtype_name, "impl": name, **timing, "baseline": "dense",
                                     "speedup": dense / timing["median_ms"]})
                    best = min(timings, key=lambda name: timings[name]["median_ms"])
                    label = "2:4" if fmt == "2:4" else f"bitmap {sparsity:.0%}"
                    progress(f"{label:<10} N={n:>6} K={k:>6} M={m:>5} {dtype_name:<9} dense "
                             f"{dense * 1e3:8.1f} us  " + "  ".join(
                                 f"{name} x{dense / t['median_ms']:.2f}" for name, t in timings.items()
                                 if name != "dense") + f"  (best: {best})")
    return rows


def crossover_rules(rows: list[dict]) -> list[dict]:
    """Dispatch-table entries: per (device, format, dtype, N, K, sparsity), the fastest dispatchable
    implementation at each measured M, merged into [[max_m, impl], ...] runs with the last open-ended. Rows
    without a format are 2:4's."""
    cases: dict[tuple, dict[int, tuple[float, str]]] = {}
    for row in rows:
        impl = DISPATCHABLE.get(row["impl"])
        if impl is None:
            continue
        key = dispatch.entry_key(row)
        m, median = int(row["m"]), float(row["median_ms"])
        best = cases.setdefault(key, {}).get(m)
        if best is None or median < best[0]:
            cases[key][m] = (median, impl)
    entries = []
    for (device, fmt, dtype, n, k, sparsity), by_m in sorted(cases.items(), key=lambda item: str(item[0])):
        rules = []
        for m in sorted(by_m):
            impl = by_m[m][1]
            if rules and rules[-1][1] == impl:
                rules[-1][0] = m
            else:
                rules.append([m, impl])
        rules[-1][0] = None
        entries.append({"device": device, "format": fmt, "dtype": dtype, "n": n, "k": k, "sparsity": sparsity,
                        "rules": rules})
    return entries


def write_table(entries: list[dict], path=None) -> Path:
    """Merge entries into the dispatch table in the user's cache (``dispatch.table_path()``; the same device,
    format, dtype, shape and sparsity replaced), atomically; return its path."""
    path = Path(path or dispatch.table_path())
    path.parent.mkdir(parents=True, exist_ok=True)
    table = json.loads(path.read_text()) if path.exists() else {"entries": []}
    keys = {dispatch.entry_key(e) for e in entries}
    table["entries"] = [e for e in table["entries"] if dispatch.entry_key(e) not in keys] + entries
    table["comment"] = ("Measured crossovers per (GPU, format, dtype, N, K, sparsity), written by `sparsekern bench "
                        "--write-table`; read by sparsekern.nn.dispatch")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    tmp.replace(path)
    dispatch.clear_caches()
    return path
