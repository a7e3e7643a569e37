"""On paper, not measured: what distributed SparseGPT pruning gains for LLaMA-70B / 405B on 1-8 GPUs.

Per decoder layer, a run of W ranks (``sparsekern.distributed``) spends, one after the other:
  data     the calibration forwards (the statistics pass and the pass that makes the next layer's inputs) and the
           Hessian accumulation, split evenly over the ranks (each has 1/W of the tokens);
  comm     the Hessians to their owners (reduce to one owner, all_reduce when a group's linears have several owners)
           and every pruned weight from its owner to all ranks (broadcast), at the interconnect's bus bandwidth;
  prune    the busiest owner's work: the SparseGPT sweep of each linear it owns plus one factorization of each
           input group's Hessian it needs (owners chosen by ``assign_owners``, the code's own rule).
Nothing overlaps (the code does not overlap them either). The rates are assumptions, named below and printed; change
them with the flags. A real run's figures replace these once measured (`bench_scale.py --ranks --device cuda`).

    python benchmarks/cost_model.py                       # NVLink (8 GPUs in one node)
    python benchmarks/cost_model.py --bandwidth-gbs 45    # one 400 Gb/s InfiniBand port per GPU (8 nodes)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sparsekern.distributed import assign_owners, linear_cost  # noqa: E402

# name: (hidden, intermediate, layers, kv width) of the published configs
MODELS = {"LLaMA-70B": (8192, 28672, 80, 1024), "LLaMA-405B": (16384, 53248, 126, 1024)}


def layer_linears(hidden: int, intermediate: int, kv: int) -> dict[str, tuple[int, int, str]]:
    """{linear: (rows, cols, input group)} of one decoder layer."""
    return {"q": (hidden, hidden, "qkv"), "k": (kv, hidden, "qkv"), "v": (kv, hidden, "qkv"),
            "o": (hidden, hidden, "o"), "gate": (intermediate, hidden, "mlp"), "up": (intermediate, hidden, "mlp"),
            "down": (hidden, intermediate, "down")}


def per_layer(model: str, world: int, args) -> dict:
    hidden, intermediate, _, kv = MODELS[model]
    linears = layer_linears(hidden, intermediate, kv)
    tokens = args.nsamples * args.seqlen
    params = sum(r * c for r, c, _ in linears.values())
    groups = {g: c for _, c, g in linears.values()}
    # data: two forwards (2 flops per parameter per token, plus attention scores and values), the Hessians (2 T n^2)
    forward = 2 * (2 * tokens * params + 4 * tokens * args.seqlen * hidden) / (args.gemm_tflops * 1e12)
    hessians = sum(2 * tokens * c * c for c in groups.values()) / (args.hessian_tflops * 1e12)
    data = (forward + hessians) / world
    owners = assign_owners({n: linear_cost(r, c) for n, (r, c, _) in linears.items()}, world)
    work = [0.0] * world
    for rank in range(world):
        mine = [n for n in linears if owners[n] == rank]
        work[rank] += sum(2 * linears[n][0] * linears[n][1] ** 2 for n in mine) / (args.sweep_tflops * 1e12)
        work[rank] += sum(2 * groups[g] ** 3 for g in {linears[n][2] for n in mine}) / (args.factor_tflops * 1e12)
    prune = max(work)
    moved = 0.0  # bytes through each rank's link
    if world > 1:
        share = (world - 1) / world
        for group, cols in groups.items():
            group_owners = {owners[n] for n, (_, _, g) in linears.items() if g == group}
            moved += cols * cols * 4 * share * (1 if len(group_owners) == 1 else 2)
        moved += params * 2 * share  # fp16/bf16 weights, broadcast from their owners
    comm = moved / (args.bandwidth_gbs * 1e9)
    return {"data": data, "comm": comm, "prune": prune, "total": data + comm + prune, "gib": moved / 2**30,
            "hessian_gib": sum(c * c * 4 for c in groups.values()) / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--gemm-tflops", type=float, default=500.0,
                        help="achieved bf16 GEMM rate of the forwards (H100 SXM dense peak: 989)")
    parser.add_argument("--hessian-tflops", type=float, default=200.0,
                        help="achieved rate of X^T X accumulated in fp32 (tf32 tensor cores)")
    parser.add_argument("--sweep-tflops", type=float, default=100.0,
                        help="achieved rate of SparseGPT's column sweep and lazy updates (fp32 GEMMs)")
    parser.add_argument("--factor-tflops", type=float, default=30.0,
                        help="achieved rate of the Cholesky factorizations and inverse (fp32; H100 fp32 peak: 67)")
    parser.add_argument("--bandwidth-gbs", type=float, default=360.0,
                        help="achieved bus bandwidth per GPU in GB/s (NVLink 4 with NVSwitch: ~360 for NCCL)")
    parser.add_argument("--ranks", default="1,2,4,8")
    args = parser.parse_args()
    print(f"assumptions: {args.nsamples} x {args.seqlen} calibration tokens; GEMM {args.gemm_tflops:g}, Hessian "
          f"{args.hessian_tflops:g}, sweep {args.sweep_tflops:g}, factorization {args.factor_tflops:g} TFLOP/s; "
          f"{args.bandwidth_gbs:g} GB/s per GPU\n")
    print("| model | GPUs | data s | comm s (GiB/GPU) | prune s | per layer s | whole model h | speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for model, (_, _, layers, _) in MODELS.items():
        base = None
        for world in [int(w) for w in args.ranks.split(",")]:
            cost = per_layer(model, world, args)
            base = base or cost["total"]
            print(f"| {model} | {world} | {cost['data']:.2f} | {cost['comm']:.2f} ({cost['gib']:.1f}) | "
                  f"{cost['prune']:.2f} | {cost['total']:.2f} | {cost['total'] * layers / 3600:.2f} | "
                  f"{base / cost['total']:.2f}x |")


if __name__ == "__main__":
    main()
