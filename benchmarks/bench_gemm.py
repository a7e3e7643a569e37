"""Compressed linear layers (2:4, and the unstructured bitmap at several sparsities) vs dense at LLaMA shapes over
batch sizes: rows to results/gemm.csv, optionally the dispatch table that SparseLinear reads (in the user's cache
folder, ``$SPARSEKERN_CACHE`` or ``~/.cache/sparsekern``).

    python benchmarks/bench_gemm.py --shapes 7b,13b,70b --dtypes float16,bfloat16     # on the GPU
    python benchmarks/bench_gemm.py --shapes 7b --write-table     # also update this user's dispatch table
    python benchmarks/bench_gemm.py --formats bitmap --sparsities 0.5,0.7 --m 1,16    # the bitmap only
    python benchmarks/bench_gemm.py --shapes tiny --device cpu --m 1,17 --no-save      # a smoke run

Weights: random, pruned by magnitude: 2:4 (rows with format "2:4", sparsity 0.5), or unstructured per row to each
of ``--sparsities`` (format "bitmap"). Implementations: dense (cuBLAS on the masked-dense weight: the baseline),
dense_compiled (torch.compile), cusparselt and cutlass (PyTorch's semi-structured 2:4, where built; 2:4 only),
triton (sparsekern's kernel: sparse24_linear or bitmap_linear), dense_decompress (cuBLAS on the weight
decompressed per call) and dispatched (SparseLinear, which picks one of them by M); ``--impls`` times only some of
them (dense always). Medians and 20/80% quantiles from CUDA events (``triton.testing.do_bench``); speedup = dense
median / this median, both from the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="7b", help="comma-separated sets: 7b, 13b, 70b, tiny")
    parser.add_argument("--m", default=None, help="comma-separated batch sizes (default: 1 .. 8192)")
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--formats", default="2:4,bitmap", help="comma-separated: 2:4, bitmap")
    parser.add_argument("--sparsities", default="0.5,0.6,0.7,0.8",
                        help="comma-separated unstructured sparsities of the bitmap weights")
    parser.add_argument("--impls", default=None, help="comma-separated implementations to time (default: all)")
    parser.add_argument("--repeat", type=int, default=20, help="timed calls on the CPU (the GPU uses CUDA events)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--write-table", action="store_true",
                        help="merge the measured crossovers into this user's dispatch table (cache folder)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        import sparsekern

        sparsekern.set_backend("interpret")  # the "triton" rows then run the kernel in the interpreter
    from sparsekern import bench

    shapes = [shape for name in args.shapes.split(",") for shape in bench.SHAPES[name]]
    m_values = [int(m) for m in args.m.split(",")] if args.m else bench.M_VALUES
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    formats = args.formats.split(",")
    sparsities = [float(s) for s in args.sparsities.split(",")]
    if any(not 0 < s < 1 for s in sparsities):
        parser.error(f"--sparsities must lie strictly between 0 and 1, got {args.sparsities}")
    try:
        bench.gemm_cases(formats, sparsities)
    except ValueError as exc:
        parser.error(str(exc))
    rows = bench.run_gemm(shapes, m_values, dtypes, device, set(args.impls.split(",")) if args.impls else None,
                          repeat=args.repeat, formats=formats, sparsities=sparsities)
    if not args.no_save:
        print(f"appended {len(rows)} rows to {append_rows('gemm', rows, device)}")
    if args.write_table:
        entries = bench.crossover_rules(rows)
        print(f"wrote {len(entries)} dispatch entries to {bench.write_table(entries)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
