"""Per-layer pruning time, PyTorch reference loop vs fused Triton kernels, at LLaMA linear shapes, with each op's
floor beside its time.

    python benchmarks/bench_prune.py --shapes 7b,13b,70b     # on the GPU
    python benchmarks/bench_prune.py --shapes tiny --device cpu --no-save   # a smoke run (interpreter)

Shapes are (rows, cols) = (out_features, in_features). Cases per shape: SparseGPT (unstructured 50%, 2:4,
2:4 + 4-bit, and 50% with the TF32 lazy update),
Wanda (50%, 2:4), magnitude 50%, the streaming Hessian update (fp32 inputs exact and TF32, bf16 and
fp16 inputs on tensor cores; 8192 calibration tokens per update), Wanda's sum of squares, and the least-squares
refit of ``--update lsq`` (20 CG iterations on a 50% mask; a GEMM loop with no kernel of its own, so only its
reference runs, against its GEMM floor). Both implementations
run on the same device in the same process: ``reference`` is ``sparsekern.reference`` (the loop the ops fall back
to), ``fused`` is the ``sparsekern.triton_kernels`` launcher the ops use on a GPU; unstructured Wanda is also
timed as the published code does it (``sort``: a full sort of every row).

Floors: the device's copy bandwidth and matmul rates are measured first; an op's floor is max(bytes it must
move / bandwidth, GEMM flops it must do / matmul rate at its precision). Rows (median and 20/80% quantiles, floor,
and the speedup over the case's baseline measured in the same run: the reference loop; the published sort for
unstructured Wanda, whose fused row also gives ``speedup_vs_reference``; the fused fp32 "ieee" run for the TF32
cases) are appended to results/prune.csv. ``--quick`` keeps the cases the GPU check needs (SparseGPT 50% and 2:4,
Wanda, magnitude, the Hessian in fp32 and bf16, the sum of squares).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows, measure, speedups  # noqa: E402

SHAPES = {
    "7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "13b": [(5120, 5120), (13824, 5120), (5120, 13824)],
    "70b": [(8192, 8192), (28672, 8192), (8192, 28672)],
    "small": [(576, 576), (1536, 576), (576, 1536)],  # SmolLM2-135M
    "tiny": [(48, 64)],  # smoke runs under the interpreter
}
# (pattern, wbits, lazy-update precision); the TF32 case is timed fused only (the reference emulates TF32 by
# rounding, which says nothing about speed).
SPARSEGPT_CASES = [("0.5", 0, "ieee"), ("2:4", 0, "ieee"), ("2:4", 4, "ieee"), ("0.5", 0, "tf32")]
WANDA_CASES = ["0.5", "2:4"]
HESSIAN_CASES = [("float32", "ieee"), ("float32", "tf32"), ("bfloat16", "ieee"), ("float16", "ieee")]
QUICK = {"sparsegpt": SPARSEGPT_CASES[:2], "hessian": [HESSIAN_CASES[0], HESSIAN_CASES[2]]}
BLOCKSIZE = 128
LSQ_ITERS = 20  # the default of --lsq-iters


def _set_tf32(enabled: bool) -> None:
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "tf32" if enabled else "ieee"
    else:
        matmul.allow_tf32 = enabled


def machine_rates(device: torch.device) -> dict:
    """Measured copy bandwidth (bytes/s) and matmul rates (flop/s) for fp32, tf32 and bf16 inputs."""
    n = 1 << 26 if device.type == "cuda" else 1 << 22
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    bandwidth = 2 * 4 * n / (measure(lambda: dst.copy_(src), device, repeat=10)["median_ms"] * 1e-3)
    size = 8192 if device.type == "cuda" else 512
    rates = {"bandwidth": bandwidth}
    for name, dtype, tf32 in [("fp32", torch.float32, False), ("tf32", torch.float32, True),
                              ("bf16", torch.bfloat16, False)]:
        a = torch.randn(size, size, device=device).to(dtype)
        if device.type == "cuda":
            _set_tf32(tf32)
        ms = measure(lambda: a @ a, device, repeat=5)["median_ms"]
        rates[name] = 2 * size**3 / (ms * 1e-3)
    if device.type == "cuda":
        _set_tf32(False)
    return rates


def calibration_hessian(cols: int, device: torch.device, tokens: int) -> torch.Tensor:
    """A realistic, correlated Hessian from random low-rank-plus-noise activations."""
    from sparsekern import reference

    hessian = torch.zeros(cols, cols, device=device)
    count = 0
    mix = torch.randn(max(1, cols // 4), cols, device=device) / max(1, cols // 4) ** 0.5
    for start in range(0, tokens, 2048):
        m = min(2048, tokens - start)
        x = torch.randn(m, mix.shape[0], device=device) @ mix + 0.3 * torch.randn(m, cols, device=device)
        count = reference.hessian_update(hessian, x, count)
    return hessian


def implementations(op: str) -> dict:
    """{"reference": the PyTorch loop, "fused": the kernel launcher (ops._KERNEL_MODULES)} for one op."""
    from sparsekern import ops, reference

    module = importlib.import_module(f"sparsekern.{ops._KERNEL_MODULES[op]}")
    return {"reference": getattr(reference, op), "fused": getattr(module, op)}


def floor_ms(rates: dict, bytes_moved: float, flops: float = 0.0, precision: str = "fp32") -> dict:
    bw = bytes_moved / rates["bandwidth"] * 1e3
    compute = flops / rates[precision] * 1e3
    return {"floor_ms": max(bw, compute), "floor_bw_ms": bw, "floor_flops_ms": compute}


def wanda_by_sort(weight: torch.Tensor, act_norm: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Unstructured Wanda as the published code does it: sort every row's scores, prune the first k."""
    scores = weight.abs().float() * act_norm
    k = int(weight.shape[1] * sparsity)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(1, torch.sort(scores, dim=-1, stable=True)[1][:, :k], True)
    weight.masked_fill_(mask, 0)
    return mask


def cases(shape, device, dtype, rates, tokens, quick=False):
    """(op, description fields, floor fields, {impl: callable}, baseline) for every case at one shape. The
    baseline is an impl of the case, or (fields, impl) of an earlier case of the same op."""
    from sparsekern import reference

    rows, cols = shape
    elt = torch.finfo(dtype).bits // 8
    weight = torch.randn(rows, cols, device=device, dtype=dtype)
    hessian = calibration_hessian(cols, device, tokens)
    upper, _ = reference.hinv_cholesky(hessian, 0.01, 4)
    norm = torch.rand(cols, device=device) + 0.1

    impl = implementations("sparsegpt_prune")
    for spec, wbits, lazy in QUICK["sparsegpt"] if quick else SPARSEGPT_CASES:
        n, m = (2, 4) if spec == "2:4" else (0, 0)
        # The lazy updates are a rows x cols x cols/2 GEMM in all; W is read and the fp32 result written, U read.
        floor = floor_ms(rates, rows * cols * (elt + 4) + cols * cols * 4, rows * cols * cols,
                         "fp32" if lazy == "ieee" else "tf32")
        fns = {name: (lambda fn=fn, n=n, m=m, wbits=wbits, lazy=lazy:
                      fn(weight, upper, 0.5, n, m, BLOCKSIZE, wbits, 0, lazy)) for name, fn in impl.items()}
        baseline = "reference"
        if lazy != "ieee":
            fns.pop("reference")
            baseline = ({"pattern": spec, "wbits": wbits, "precision": "ieee"}, "fused")
        yield "sparsegpt_prune", {"pattern": spec, "wbits": wbits, "precision": lazy}, floor, fns, baseline
    impl = implementations("wanda_prune")
    for spec in WANDA_CASES:
        n, m = (2, 4) if spec == "2:4" else (0, 0)
        work = weight.clone()
        # Read W, write W (in place) and the bool mask. Pruning an already-pruned copy costs the same.
        floor = floor_ms(rates, rows * cols * (2 * elt + 1) + cols * 4)
        fns = {name: (lambda fn=fn, n=n, m=m: fn(work, norm, 0.5, n, m)) for name, fn in impl.items()}
        if not n:
            fns["sort"] = lambda: wanda_by_sort(work, norm, 0.5)
        yield "wanda_prune", {"pattern": spec, "wbits": 0}, floor, fns, "reference" if n else "sort"
    impl = implementations("magnitude_prune")
    work = weight.clone()
    yield "magnitude_prune", {"pattern": "0.5", "wbits": 0}, floor_ms(rates, rows * cols * (2 * elt + 1)), {
        name: (lambda fn=fn: fn(work, 0.5, 0, 0)) for name, fn in impl.items()}, "reference"

    batch = min(tokens, 8192)
    for x_dtype, precision in QUICK["hessian"] if quick else HESSIAN_CASES:
        x = torch.randn(batch, cols, device=device).to(getattr(torch, x_dtype))
        h = torch.zeros(cols, cols, device=device)
        x_elt = x.element_size()
        rate = {"float32": "fp32" if precision == "ieee" else "tf32"}.get(x_dtype, "bf16")
        # Symmetric: half of the 2 m k^2 flops; x read once, H read and written.
        floor = floor_ms(rates, batch * cols * x_elt + 2 * cols * cols * 4, batch * cols * cols, rate)
        impl = implementations("hessian_update")
        fns = {"reference": lambda fn=impl["reference"]: fn(h, x, 1),
               "fused": lambda fn=impl["fused"], p=precision: fn(h, x, 1, input_precision=p)}
        fields = {"pattern": "-", "wbits": 0, "x_dtype": x_dtype, "precision": precision, "tokens": batch}
        baseline = "reference"
        if precision == "tf32":
            fns.pop("reference")  # the reference is exact fp32: compared in the ieee row
            baseline = ({**fields, "precision": "ieee"}, "fused")
        yield "hessian_update", fields, floor, fns, baseline
    # The least-squares refit after SparseGPT (--update lsq) has no kernel of its own: it is LSQ_ITERS GEMMs of
    # [rows, cols] x [cols, cols] (cuBLAS), timed against that floor and beside SparseGPT's own time above.
    mask = torch.rand(rows, cols, device=device) < 0.5
    dense32 = weight.float()
    start = dense32.masked_fill(mask, 0)
    damped = hessian + 0.01 * torch.diagonal(hessian).mean() * torch.eye(cols, device=device)
    floor = floor_ms(rates, LSQ_ITERS * (rows * cols * 4 * 4 + cols * cols * 4), LSQ_ITERS * 2 * rows * cols * cols)
    yield "lsq_refit", {"pattern": "0.5", "wbits": 0, "iters": LSQ_ITERS}, floor, {
        "reference": lambda: reference.lsq_refit(dense32, start, damped, mask, LSQ_ITERS)}, "reference"

    x = torch.randn(batch, cols, device=device, dtype=dtype)
    s = torch.zeros(cols, device=device)
    impl = implementations("sumsq_update")
    yield "sumsq_update", {"pattern": "-", "wbits": 0, "x_dtype": str(dtype).removeprefix("torch."),
                           "tokens": batch}, floor_ms(rates, batch * cols * elt), {
        name: (lambda fn=fn: fn(s, x, 1)) for name, fn in impl.items()}, "reference"


def run(shape, device, dtype, rates, repeat, tokens, quick=False) -> list[dict]:
    results = []
    fused_timings = {}  # (op, fields) -> the fused timing, for later cases that take it as their baseline
    for op, fields, floor, fns, baseline in cases(shape, device, dtype, rates, tokens, quick):
        timings = {name: measure(fn, device, repeat=repeat) for name, fn in fns.items()}
        main_impl = "fused" if "fused" in timings else "reference"  # an op without a kernel: its reference
        fused_timings[op, repr(fields)] = timings[main_impl]
        if isinstance(baseline, tuple):
            base_fields, base_impl = baseline
            base = {"impl": f"{base_impl} {base_fields['precision']}", **fused_timings[op, repr(base_fields)]}
        else:
            base = {"impl": baseline, **timings[baseline]}
        case_rows = [{"op": op, "impl": name, "rows": shape[0], "cols": shape[1], **fields,
                      "dtype": str(dtype).removeprefix("torch."), **timing, **floor}
                     for name, timing in timings.items()]
        speedups(case_rows, base)
        fused = timings[main_impl]["median_ms"]
        if base["impl"] != "reference" and "reference" in timings:
            fused_row = case_rows[list(timings).index("fused")]
            fused_row["speedup_vs_reference"] = timings["reference"]["median_ms"] / fused
        results += case_rows
        described = " ".join(f"{v}" for k, v in fields.items() if k in ("pattern", "x_dtype", "precision"))
        reference = timings.get("reference", {}).get("median_ms")
        ref_text = f"{reference:10.2f}" if reference else f"{'-':>10}"
        print(f"{op:<16}{shape[0]:>6}x{shape[1]:<6} {described:<18} ref {ref_text} ms  {main_impl} {fused:9.3f} ms "
              f"x{base['median_ms'] / fused:6.1f} vs {base['impl']:<11} floor {floor['floor_ms']:8.3f} ms "
              f"({fused / floor['floor_ms']:.1f}x floor)", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="7b", help=f"comma-separated sets: {', '.join(SHAPES)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=8192, help="calibration tokens behind each Hessian")
    parser.add_argument("--quick", action="store_true", help="only the cases the GPU check needs (see above)")
    parser.add_argument("--no-save", action="store_true", help="print only; do not append to results/prune.csv")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    rates = machine_rates(device)
    print(f"device: bandwidth {rates['bandwidth'] / 1e9:.0f} GB/s; matmul fp32 {rates['fp32'] / 1e12:.1f}, "
          f"tf32 {rates['tf32'] / 1e12:.1f}, bf16 {rates['bf16'] / 1e12:.1f} TFLOP/s", flush=True)
    rows = []
    for name in args.shapes.split(","):
        for shape in SHAPES[name]:
            rows += run(shape, device, getattr(torch, args.dtype), rates, args.repeat, args.tokens, args.quick)
    for row in rows:
        row.update(bandwidth_gbs=rates["bandwidth"] / 1e9, fp32_tflops=rates["fp32"] / 1e12,
                   tf32_tflops=rates["tf32"] / 1e12, bf16_tflops=rates["bf16"] / 1e12)
    if not args.no_save:
        print(f"appended {len(rows)} rows to {append_rows('prune', rows, device)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
