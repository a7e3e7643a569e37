"""Per-layer pruning time of the public ops at LLaMA linear shapes (rows = out_features, cols = in_features).

    python benchmarks/bench_prune.py --shapes 7b            # on the GPU when there is one
    python benchmarks/bench_prune.py --shapes small --device cpu

For each shape: SparseGPT (unstructured 50%, 2:4, 2:4 + 4-bit), Wanda (50%, 2:4), magnitude (50%), and the
inverse-Hessian factor, through ``sparsekern.ops`` on the active backend (``SPARSEKERN_BACKEND`` picks it;
today every op runs its PyTorch reference). Rows are appended to results/prune.csv.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows, measure  # noqa: E402

from sparsekern import get_backend, ops  # noqa: E402

SHAPES = {
    "7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "13b": [(5120, 5120), (13824, 5120), (5120, 13824)],
    "70b": [(8192, 8192), (28672, 8192), (8192, 28672)],
    "small": [(576, 576), (1536, 576), (576, 1536)],  # SmolLM2-135M
}
CASES = [  # (op, pattern, wbits)
    ("sparsegpt_prune", "0.5", 0), ("sparsegpt_prune", "2:4", 0), ("sparsegpt_prune", "2:4", 4),
    ("wanda_prune", "0.5", 0), ("wanda_prune", "2:4", 0), ("magnitude_prune", "0.5", 0),
    ("hinv_cholesky", "-", 0),
]


def calibration_hessian(cols: int, device: torch.device, tokens: int) -> torch.Tensor:
    """A realistic, correlated Hessian from random low-rank-plus-noise activations."""
    hessian = torch.zeros(cols, cols, device=device)
    count = 0
    mix = torch.randn(cols // 4, cols, device=device) / (cols // 4) ** 0.5
    for start in range(0, tokens, 2048):
        m = min(2048, tokens - start)
        x = torch.randn(m, cols // 4, device=device) @ mix + 0.3 * torch.randn(m, cols, device=device)
        ops.hessian_update(hessian, x, count)
        count += m
    return hessian


def run(shape: tuple[int, int], device: torch.device, dtype: torch.dtype, repeat: int, tokens: int) -> list[dict]:
    rows, cols = shape
    weight = torch.randn(rows, cols, device=device, dtype=dtype)
    hessian = calibration_hessian(cols, device, tokens)
    upper, _ = ops.hinv_cholesky(hessian, 0.01, 4)
    norm = torch.rand(cols, device=device) + 0.1
    results = []
    for op, spec, wbits in CASES:
        n, m = (2, 4) if spec == "2:4" else (0, 0)
        if op == "sparsegpt_prune":
            fn = lambda: ops.sparsegpt_prune(weight, upper, 0.5, n, m, 128, wbits, 0)  # noqa: E731
        elif op == "wanda_prune":
            fn = lambda: ops.wanda_prune(weight.clone(), norm, 0.5, n, m)  # noqa: E731
        elif op == "magnitude_prune":
            fn = lambda: ops.magnitude_prune(weight.clone(), 0.5, 0, 0)  # noqa: E731
        else:
            fn = lambda: ops.hinv_cholesky(hessian, 0.01, 4)  # noqa: E731
        timing = measure(fn, device, repeat=repeat)
        results.append({"op": op, "rows": rows, "cols": cols, "pattern": spec, "wbits": wbits,
                        "dtype": str(dtype).removeprefix("torch."), "backend": get_backend(), **timing})
        print(f"{op:<16} {rows:>6}x{cols:<6} {spec:>4} w{wbits}  {timing['median_ms']:10.1f} ms "
              f"[{timing['p20_ms']:.1f}, {timing['p80_ms']:.1f}]", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="7b", help=f"comma-separated sets: {', '.join(SHAPES)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=8192, help="calibration tokens behind each Hessian")
    parser.add_argument("--no-save", action="store_true", help="print only; do not append to results/prune.csv")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for name in args.shapes.split(","):
        for shape in SHAPES[name]:
            rows += run(shape, device, getattr(torch, args.dtype), args.repeat, args.tokens)
    if not args.no_save:
        print(f"appended {len(rows)} rows to {append_rows('prune', rows, device)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
