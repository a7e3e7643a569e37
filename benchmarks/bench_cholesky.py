"""The Cholesky family ops against the calls they replace: time, peak extra memory, float64-checked accuracy.

    python benchmarks/bench_cholesky.py --device cuda      # n = 4096 .. 28672; update/delete n = 1024, 4096, B = 16
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_cholesky.py --device cpu      # n = 576, 1536
    python benchmarks/bench_cholesky.py --device cpu --quick --no-save            # a smoke run

Ops (``sparsekern.ops``; ``impl`` is ``native`` when sparsekern._C ran them, ``reference-fallback`` when the
PyTorch reference did) and their baselines:
- hinv_cholesky and the in-place hinv_cholesky_ vs ``three-call``, ``reference.hinv_cholesky``: the published
  Cholesky, cholesky_inverse, Cholesky sequence. Hessians are H = 2 X^T X / m from m = 2n random rows with
  log-normal channel scales (LLM activations have outlier channels; condition ~1e4 after damping), summed over
  row chunks so that no m x n matrix exists. The in-place op's time includes restoring H (an n^2 copy, against
  O(n^3) work).
- cholesky_update with k rows (an update, then the downdate by the same X) and cholesky_delete (a random input
  per batch entry), batched, vs ``refactor``: forming R^T R +- X^T X (or the Schur complement of U^T U without
  the deleted input) and factoring it again.

Columns: median and 20/80% quantiles in ms (a call over a second runs 3 times); speedup = baseline median / the
row's median in the same run (1.0 on the baseline's own row); rel_err = ||F^T F - T||_F / ||T||_F for the factor
F against the exact target T in float64 (n <= 4096), e.g. T = (H + damp I)^-1; peak_extra_bytes (and
peak_extra_n2, in n^2 fp32 units) = memory
beyond the input H at the hinv op's peak, its output included. On the GPU from the allocator's peak statistics;
on the CPU a high-water-mark estimate: ru_maxrss cannot be reset, so each measurement runs in a process forked
for it from a helper that has only imported (a fresh heap), which warms the op up at n/4 (LAPACK's code pages and
thread pool would count otherwise), touches H, and subtracts ru_maxrss before the call from ru_maxrss after.
Rows are appended to results/cholesky.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows, measure, speedups  # noqa: E402

from sparsekern import ops, reference  # noqa: E402

SIZES = {"cpu": [576, 1536], "cuda": [4096, 11008, 13824, 28672]}
BATCHED = {"cpu": [(576, 8), (1536, 2)], "cuda": [(1024, 16), (4096, 16)]}  # (n, B)
QUICK_SIZES, QUICK_BATCHED, QUICK_KS = [64, 96], [(64, 4), (96, 2)], [1, 4]
PERCDAMP, MAX_TRIES = 0.01, 4
ACCURACY_MAX_N = 4096  # the float64 target is an O(n^3) float64 inverse


def impl_name(op: str, device: torch.device) -> str:
    """How ``op`` runs on ``device``: sparsekern._C's kernel, or the reference under the same op name."""
    return "native" if device.type.upper() in ops.NATIVE_KEYS[op] else "reference-fallback"


def hinv_cases(device: torch.device) -> list[tuple[str, str]]:
    """(op, impl) of the hinv rows, the baseline first."""
    return [("hinv_cholesky", "three-call"), ("hinv_cholesky", impl_name("hinv_cholesky", device)),
            ("hinv_cholesky_", impl_name("hinv_cholesky_", device))]


def hessian(n: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """H = 2 X^T X / m, m = 2n rows with log-normal channel scales, accumulated over row chunks."""
    g = torch.Generator(device).manual_seed(seed)
    scale = torch.randn(n, generator=g, device=device).exp()
    m = 2 * n
    chunk = 4096 if device.type == "cuda" else 16  # small on the CPU: its temporaries would hide in ru_maxrss
    h = torch.zeros(n, n, device=device)
    for start in range(0, m, chunk):
        x = torch.randn(min(chunk, m - start), n, generator=g, device=device) * scale
        h.addmm_(x.T, x, alpha=2 / m)
    return h


def hinv(op: str, impl: str, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, damp) from one call as a caller makes it; hinv_cholesky_ overwrites h with U."""
    if impl == "three-call":
        return reference.hinv_cholesky(h, PERCDAMP, MAX_TRIES)
    if op == "hinv_cholesky":
        return ops.hinv_cholesky(h, PERCDAMP, MAX_TRIES)
    return h, ops.hinv_cholesky_(h, PERCDAMP, MAX_TRIES)


def rel_err(factor: torch.Tensor, target: torch.Tensor) -> float:
    f = factor.double()
    return float((f.mT @ f - target).norm() / target.norm())


def damped_inverse(h: torch.Tensor, damp: torch.Tensor) -> torch.Tensor:
    h = (h.double() + h.double().T) / 2
    h.diagonal().add_(float(damp))
    return torch.cholesky_inverse(torch.linalg.cholesky(h))


def timing(fn, device: torch.device, repeat: int) -> dict:
    """common.measure, after a first call that is the warm-up and decides the repeats: a call over a second (the
    reference fallback's Python loops at k = 128, the three-call baseline at n = 28672) runs 3 times."""
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    slow = time.perf_counter() - start > 1.0
    return measure(fn, device, repeat=min(repeat, 3) if slow else repeat, warmup=0)


def maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def cpu_extra(op: str, impl: str, n: int) -> int:
    # The warm-up pages in LAPACK's code and starts the thread pool; at n/4 its peak stays below the one H sets.
    hinv(op, impl, hessian(max(16, n // 4), torch.device("cpu")))
    h = hessian(n, torch.device("cpu"))
    before = maxrss()
    hinv(op, impl, h)
    return maxrss() - before


def memory_probe(sizes: list[int]) -> None:
    """Print one JSON line per (op, impl, n): CPU peak extra bytes, each measured in a forked child (whose
    ru_maxrss starts at its RSS at the fork). This process only imports, so every child starts from a fresh heap
    and without an OpenMP pool (which fork would break)."""
    for n in sizes:
        for op, impl in hinv_cases(torch.device("cpu")):
            pid = os.fork()
            if pid == 0:  # the child: measure, report, exit without the parent's clean-up
                try:
                    os.write(1, (json.dumps([op, impl, n, cpu_extra(op, impl, n)]) + "\n").encode())
                except BaseException:
                    traceback.print_exc()
                    sys.stderr.flush()
                    os._exit(1)
                os._exit(0)
            if os.waitpid(pid, 0)[1]:
                raise SystemExit(f"memory probe {op} ({impl}) at n={n} failed")


def cpu_extras(sizes: list[int]) -> dict:
    """{(op, impl, n): bytes} from a helper process (see memory_probe)."""
    done = subprocess.run([sys.executable, __file__, "--memory-probe", ",".join(map(str, sizes))],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the CPU memory probe failed:\n{done.stderr[-3000:]}")
    return {tuple(line[:3]): line[3] for line in map(json.loads, done.stdout.splitlines())}


def gpu_extra(op: str, impl: str, h: torch.Tensor) -> int:
    h = h.clone() if op == "hinv_cholesky_" else h
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = hinv(op, impl, h)
    torch.cuda.synchronize()
    del result
    return torch.cuda.max_memory_allocated() - before


def hinv_rows(n: int, device: torch.device, repeat: int, extras: dict) -> list[dict]:
    h = hessian(n, device)
    work = torch.empty_like(h)
    rows = []
    for op, impl in hinv_cases(device):  # the baseline first: the ops' speedups divide by its median
        def fn(op=op, impl=impl):
            return hinv(op, impl, work.copy_(h) if op == "hinv_cholesky_" else h)

        row = {"op": op, "impl": impl, "n": n, "batch": 1, **timing(fn, device, repeat)}
        speedups([row], rows[0] if rows else row)
        extra = gpu_extra(op, impl, h) if device.type == "cuda" else extras[op, impl, n]
        row.update(peak_extra_bytes=extra, peak_extra_n2=extra / (4 * n * n))
        if n <= ACCURACY_MAX_N:
            upper, damp = fn()
            row["rel_err"] = rel_err(upper, damped_inverse(h, damp))
        show(row)
        rows.append(row)
    return rows


def schur(m: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """M[-q, -q] - M[-q, q] M[q, -q] / M[q, q] for q = index[b], batched: [B, n-1, n-1]."""
    batch, n = m.shape[0], m.shape[-1]
    kept = torch.arange(n - 1, device=m.device).expand(batch, n - 1)
    kept = kept + (kept >= index[:, None]).long()
    rows = m.gather(1, kept[:, :, None].expand(batch, n - 1, n))
    m_kk = rows.gather(2, kept[:, None, :].expand(batch, n - 1, n - 1))
    m_kq = rows.gather(2, index[:, None, None].expand(batch, n - 1, 1))
    m_qq = m[torch.arange(batch, device=m.device), index, index]
    return m_kk - m_kq @ m_kq.mT / m_qq[:, None, None]


def refactor_delete(upper: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.linalg.cholesky(schur(upper.mT @ upper, index), upper=True)


def batched_rows(n: int, batch: int, ks: list[int], delete: bool, device: torch.device, repeat: int
                 ) -> list[dict]:
    """cholesky_update (up and down, for each k) and cholesky_delete on B inverse-Hessian factors, vs refactor."""
    upper = torch.stack([reference.hinv_cholesky(hessian(n, device, seed=b), PERCDAMP, MAX_TRIES)[0]
                         for b in range(batch)])
    g = torch.Generator(device).manual_seed(0)
    cases = []  # (fields, baseline, op, exact target of the new factor's Gram matrix)
    for k in ks:
        # Random combinations of the factor's rows: X^T X is on the scale of R^T R, so the downdate is benign.
        x = torch.randn(batch, k, n, generator=g, device=device) @ upper / n**0.5
        updated = ops.cholesky_update(upper, x, False)
        for downdate, start in [(False, upper), (True, updated)]:
            sign = -1.0 if downdate else 1.0
            s64, x64 = start.double(), x.double()
            cases.append(({"op": "cholesky_update", "k": k, "downdate": int(downdate)},
                          lambda start=start, x=x, sign=sign: torch.linalg.cholesky(
                              start.mT @ start + sign * (x.mT @ x), upper=True),
                          lambda start=start, x=x, downdate=downdate: ops.cholesky_update(start, x, downdate),
                          s64.mT @ s64 + sign * (x64.mT @ x64)))
    if delete:
        index = torch.randint(n, (batch,), generator=g, device=device)
        u64 = upper.double()
        cases.append(({"op": "cholesky_delete"}, lambda: refactor_delete(upper, index),
                      lambda: ops.cholesky_delete(upper, index)[0], schur(u64.mT @ u64, index)))
    rows = []
    for fields, baseline, op, target in cases:
        base = {**fields, "impl": "refactor", "n": n, "batch": batch, **timing(baseline, device, repeat),
                "rel_err": rel_err(baseline(), target)}
        mine = {**fields, "impl": impl_name(fields["op"], device), "n": n, "batch": batch, **timing(op, device, repeat),
                "rel_err": rel_err(op(), target)}
        speedups([base, mine], base)
        show(base)
        show(mine)
        rows += [base, mine]
    return rows


def show(row: dict) -> None:
    case = f"n={row['n']}" if row["batch"] == 1 else f"B={row['batch']} n={row['n']}"
    if "k" in row:
        case += f" k={row['k']} {'down' if row['downdate'] else 'up'}"
    speedup = f"x{row['speedup']:.2f}" if row["impl"] != row["baseline"] else ""
    extra = (f"{row['peak_extra_n2']:5.2f} n^2 ({row['peak_extra_bytes'] / 2**20:7.1f} MiB)"
             if "peak_extra_bytes" in row else "")
    err = f"{row['rel_err']:.1e}" if "rel_err" in row else ""
    print(f"{row['op']:<16}{case:<22}{row['impl']:<19}{row['median_ms']:10.2f} [{row['p20_ms']:9.2f},"
          f"{row['p80_ms']:9.2f}] {speedup:>8} {extra:>24} {err:>8}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", default=None, help="hinv_cholesky n, comma-separated (default per device)")
    parser.add_argument("--batched", default=None, help="update/delete n:B pairs, comma-separated (default per "
                        "device)")
    parser.add_argument("--ks", default="1,16,128", help="rows of X for cholesky_update")
    parser.add_argument("--ops", default="hinv,update,delete")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help=f"tiny sizes: n={QUICK_SIZES}, n:B={QUICK_BATCHED}, "
                        f"k={QUICK_KS}")
    parser.add_argument("--no-save", "--no-write", action="store_true", help="print only; do not append to "
                        "results/cholesky.csv")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)  # the helper process of cpu_extras
    args = parser.parse_args(argv)
    if args.memory_probe:
        memory_probe([int(n) for n in args.memory_probe.split(",")])
        return 0
    device = torch.device(args.device)
    sizes = [int(n) for n in args.sizes.split(",")] if args.sizes else SIZES[device.type]
    batched = ([tuple(int(v) for v in pair.split(":")) for pair in args.batched.split(",")] if args.batched
               else BATCHED[device.type])
    ks = [int(k) for k in args.ks.split(",")]
    if args.quick:
        sizes, batched, ks = QUICK_SIZES, QUICK_BATCHED, QUICK_KS
    wanted = set(args.ops.split(","))
    if wanted - {"hinv", "update", "delete"}:
        parser.error(f"--ops takes hinv, update, delete; got {args.ops}")
    impls = ", ".join(f"{op} {impl_name(op, device)}" for op in ops.NATIVE_KEYS)
    print(f"{device}: {impls}; median [p20, p80] ms, speedup over the baseline, peak extra memory "
          "beyond H, rel_err vs float64", flush=True)
    rows = []
    if "hinv" in wanted:
        extras = cpu_extras(sizes) if device.type == "cpu" else {}
        for n in sizes:
            rows += hinv_rows(n, device, args.repeat, extras)
    if wanted & {"update", "delete"}:
        for n, batch in batched:
            rows += batched_rows(n, batch, ks if "update" in wanted else [], "delete" in wanted, device, args.repeat)
    if not args.no_save:
        print(f"appended {len(rows)} rows to {append_rows('cholesky', rows, device)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
