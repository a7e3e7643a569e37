"""2:4 linear layer vs dense at LLaMA shapes over batch sizes: rows to results/gemm.csv, optionally the dispatch
table that SparseLinear ships with.

    python benchmarks/bench_gemm.py --shapes 7b,13b,70b --dtypes float16,bfloat16     # on the GPU
    python benchmarks/bench_gemm.py --shapes 7b --write-table     # also update sparsekern/nn/dispatch_table.json
    python benchmarks/bench_gemm.py --shapes tiny --device cpu --m 1,17 --no-save      # a smoke run

Implementations: dense (cuBLAS), dense_compiled (torch.compile), cusparselt and cutlass (PyTorch's
semi-structured 2:4, where built), triton (sparsekern's kernel), dense_decompress (cuBLAS on the weight
decompressed per call) and dispatched (SparseLinear, which picks one of them by M); ``--impls`` times only some
of them (dense always). Medians and 20/80% quantiles from CUDA events (``triton.testing.do_bench``); speedup =
dense median / this median, both from the same run.
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
    parser.add_argument("--impls", default=None, help="comma-separated implementations to time (default: all)")
    parser.add_argument("--repeat", type=int, default=20, help="timed calls on the CPU (the GPU uses CUDA events)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--write-table", action="store_true", help="update the shipped dispatch table")
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
    rows = bench.run_gemm(shapes, m_values, dtypes, device, set(args.impls.split(",")) if args.impls else None,
                          repeat=args.repeat)
    if not args.no_save:
        print(f"appended {len(rows)} rows to {append_rows('gemm', rows, device)}")
    if args.write_table:
        entries = bench.crossover_rules(rows)
        bench.write_table(entries)
        print(f"wrote {len(entries)} dispatch entries to sparsekern/nn/dispatch_table.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
