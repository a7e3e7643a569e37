"""Plot benchmark results.

    python benchmarks/plot.py                      # results/prune.csv -> results/prune.png
    python benchmarks/plot.py --kind gemm          # results/gemm.csv -> results/gemm.png
    python benchmarks/plot.py --kind cholesky      # results/cholesky.csv -> results/cholesky.png
    python benchmarks/plot.py --kind quality       # results/quality.csv -> results/quality.png
    python benchmarks/plot.py --device H100 --out /tmp/prune.png

prune: one panel per op; bars per (shape, pattern) case, log-scaled milliseconds: reference median, fused
median, and the floor as a marker. gemm: one panel per (device, dtype, N x K); speedup over dense cuBLAS against
the batch size M, one line per implementation and weight (2:4, or the bitmap at each sparsity). cholesky: one
panel per op; the op's speedup over its baseline (three-call, refactor) per case and device. quality: one panel
per (model, pattern); each configuration's held-out perplexity over SparseGPT's (uniform, same seeds), mean and
spread over the seeds. The newest row of each case is used. Needs matplotlib (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BASELINES = ("three-call", "refactor")  # bench_cholesky's baselines: the plot shows the ops' speedups over them


def newest_rows(path: Path, device_filter: str | None, key, keep=lambda row: True) -> dict:
    """{key(row): row} over the rows ``keep`` accepts whose device contains ``device_filter``; later rows win."""
    newest = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if keep(row) and (not device_filter or device_filter.lower() in row["device"].lower()):
                newest[key(row)] = row
    return newest


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, out: Path) -> Path:
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def latest_rows(path: Path, device_filter: str | None) -> list[dict]:
    return list(newest_rows(
        path, device_filter,
        key=lambda row: (row["device"], row["op"], row["rows"], row["cols"], row["pattern"], row["wbits"],
                         row.get("x_dtype", ""), row.get("precision", ""), row["impl"]),
        keep=lambda row: row.get("impl"),  # rows from before the reference/fused split lack it
    ).values())


def case_label(row: dict) -> str:
    label = f"{row['rows']}x{row['cols']}"
    if row["op"] in ("hessian_update", "sumsq_update"):
        return f"{label} {row.get('x_dtype', '')} {row.get('precision', '')}".strip()
    label += f" {row['pattern']}" + (f" w{row['wbits']}" if row["wbits"] not in ("", "0") else "")
    return label + (" tf32" if row.get("precision") == "tf32" else "")


def plot(rows: list[dict], out: Path) -> Path:
    plt = pyplot()
    ops = sorted({r["op"] for r in rows})
    if not ops:
        raise SystemExit("no rows with an impl column to plot")
    fig, axes = plt.subplots(len(ops), 1, figsize=(12, 3.2 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        cases = {}
        for row in (r for r in rows if r["op"] == op):
            cases.setdefault((row["device"], case_label(row)), {})[row["impl"]] = row
        labels = [f"{label}\n{device[:18]}" for device, label in cases]
        xs = range(len(cases))
        for offset, impl, color in [(-0.2, "reference", "tab:gray"), (0.2, "fused", "tab:blue")]:
            values = [float(c[impl]["median_ms"]) if impl in c else 0.0 for c in cases.values()]
            ax.bar([x + offset for x in xs], values, width=0.4, label=impl, color=color)
        floors = [float(next(iter(c.values()))["floor_ms"] or "nan") for c in cases.values()]
        ax.scatter(list(xs), floors, marker="_", s=400, color="black", label="floor", zorder=3)
        ax.set_yscale("log")
        ax.set_ylabel("ms (median)")
        ax.set_title(op)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=7)
        ax.legend(fontsize=8)
    return save(fig, out)


def _gemm_case(row: dict) -> str:
    """The weight's format and sparsity as a label: "2:4" (also rows from before the formats), "bitmap 70%"."""
    fmt = row.get("format") or "2:4"
    return fmt if fmt == "2:4" else f"{fmt} {float(row['sparsity']):.0%}"


def plot_gemm(csv_path: Path, device_filter: str | None, out: Path) -> Path:
    plt = pyplot()
    newest = newest_rows(csv_path, device_filter,
                         key=lambda row: (row["device"], row["dtype"], row["n"], row["k"], row["m"], row["impl"],
                                          _gemm_case(row)))
    panels = sorted({key[:4] for key in newest})
    if not panels:
        raise SystemExit("no gemm rows to plot")
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3.2 * len(panels)), squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        lines = sorted({(key[6], key[5]) for key in newest if key[:4] == panel and key[5] != "dense"})
        for case, impl in lines:
            points = sorted((int(key[4]), float(row["speedup"])) for key, row in newest.items()
                            if key[:4] == panel and (key[6], key[5]) == (case, impl))
            ax.plot([m for m, _ in points], [v for _, v in points], marker="o", label=f"{impl} ({case})",
                    linestyle="-" if case == "2:4" else "--")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (rows of x)")
        ax.set_ylabel("speedup over dense")
        ax.set_title(f"{panel[1]} N={panel[2]} K={panel[3]} ({panel[0][:30]})")
        ax.legend(fontsize=7)
    return save(fig, out)


def plot_cholesky(csv_path: Path, device_filter: str | None, out: Path) -> Path:
    plt = pyplot()
    newest = newest_rows(
        csv_path, device_filter,
        key=lambda row: (row["op"], row["device"], row["impl"], row["n"], row["batch"], row.get("k", ""),
                         row.get("downdate", "")),  # hinv-only files lack the update columns
        keep=lambda row: row["impl"] not in BASELINES,
    )
    ops = sorted({key[0] for key in newest})
    if not ops:
        raise SystemExit("no cholesky op rows to plot")
    widest = max(sum(key[0] == op for key in newest) for op in ops)
    fig, axes = plt.subplots(len(ops), 1, figsize=(max(8, 1.1 * widest), 3.2 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        cases = [(key, row) for key, row in newest.items() if key[0] == op]
        labels = [f"n={key[3]} B={key[4]}" + (f"\nk={key[5]} {'down' if key[6] == '1' else 'up'}" if key[5] else "")
                  + f"\n{key[2]}\n{key[1][:14]}" for key, _ in cases]
        ax.bar(range(len(cases)), [float(row["speedup"]) for _, row in cases], color="tab:blue")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("speedup over baseline")
        ax.set_title(op)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(labels, fontsize=7)
    return save(fig, out)


# method, update, refine, allocation, permute, order
QUALITY_BASELINE = ("sparsegpt", "none", "none", "uniform", "-", "-")


def quality_config(row: dict) -> tuple:
    """A quality.csv row's (model, pattern, method, update, refine, allocation, permute, order); a sensitivity fit is
    labelled with its windows ("sensitivity/4"; rows without the column fitted on all of them), and order is
    "true-seq" for a true-sequential run ("-": every linear of a layer from the same inputs; rows without the column
    ran that way). bench_quality's summary groups by it too."""
    allocation = row["allocation"]
    if allocation == "sensitivity":
        allocation = f"sensitivity/{row.get('fit_windows') or row.get('nsamples') or 'all'}"
    return (row["model"], row["pattern"], row["method"], row["update"], row["refine"], allocation,
            "permuted" if row.get("permute") == "True" else "-",
            "true-seq" if row.get("true_sequential") == "True" else "-")


CONFIG_LEN = 2 + len(QUALITY_BASELINE)  # model, pattern, then the configuration


def plot_quality(csv_path: Path, out: Path) -> Path:
    plt = pyplot()
    newest = newest_rows(
        csv_path, None,
        key=lambda row: (*quality_config(row), row["seed"]))
    panels = sorted({key[:2] for key in newest})
    if not panels:
        raise SystemExit("no quality rows to plot")
    configs = {panel: sorted({key[2:CONFIG_LEN] for key in newest if key[:2] == panel}) for panel in panels}
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 0.35 * sum(map(len, configs.values())) + 1.2 * len(panels)),
                             squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        bars = []
        for config in configs[panel]:
            ratios = []
            for key, row in newest.items():
                base = newest.get((*panel, *QUALITY_BASELINE, key[CONFIG_LEN]))
                if key[:CONFIG_LEN] == (*panel, *config) and base:
                    ratios.append(float(row["perplexity"]) / float(base["perplexity"]))
            if ratios:
                mean = sum(ratios) / len(ratios)
                spread = (sum((r - mean) ** 2 for r in ratios) / (len(ratios) - 1)) ** 0.5 if len(ratios) > 1 else 0
                label = " ".join(part for part in config if part not in ("none", "-")) + f" ({len(ratios)})"
                bars.append((mean, spread, label, config == QUALITY_BASELINE))
        bars.sort()
        # points on a log axis: ratios span 0.5x to 10^5x (magnitude), and the differences near 1x are what matter
        for row, (mean, spread, _, baseline) in enumerate(bars):
            ax.errorbar(mean, row, xerr=spread, fmt="o", color="tab:gray" if baseline else "tab:blue", capsize=2)
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(bars)))
        ax.set_yticklabels([b[2] for b in bars], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("perplexity / SparseGPT's (lower is better; seeds in brackets)")
        ax.set_title(f"{panel[0]} {panel[1]}")
    return save(fig, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", default="prune", choices=["prune", "gemm", "cholesky", "quality"])
    parser.add_argument("--csv", default=None, help="default: results/<kind>.csv")
    parser.add_argument("--device", default=None, help="only rows whose device name contains this")
    parser.add_argument("--out", default=None, help="default: results/<kind>.png")
    args = parser.parse_args(argv)
    csv_path = Path(args.csv or RESULTS / f"{args.kind}.csv")
    out = Path(args.out or RESULTS / f"{args.kind}.png")
    if args.kind == "gemm":
        print(f"wrote {plot_gemm(csv_path, args.device, out)}")
    elif args.kind == "quality":
        print(f"wrote {plot_quality(csv_path, out)}")
    elif args.kind == "cholesky":
        print(f"wrote {plot_cholesky(csv_path, args.device, out)}")
    else:
        print(f"wrote {plot(latest_rows(csv_path, args.device), out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
