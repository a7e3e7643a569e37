"""Plot benchmark results: per-layer time of the reference loop vs the fused kernels, with each op's floor.

    python benchmarks/plot.py                      # results/prune.csv -> results/prune.png
    python benchmarks/plot.py --device H100 --out /tmp/prune.png

One panel per op; bars per (shape, pattern) case, log-scaled milliseconds: reference median, fused median, and
the floor as a marker. The newest row of each (device, op, case, impl) is used. Needs matplotlib (the ``bench``
extra).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def latest_rows(path: Path, device_filter: str | None) -> list[dict]:
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("impl")]  # rows from before the reference/fused split lack it
    if device_filter:
        rows = [r for r in rows if device_filter.lower() in r["device"].lower()]
    newest = {}
    for row in rows:  # later rows win
        key = (row["device"], row["op"], row["rows"], row["cols"], row["pattern"], row["wbits"],
               row.get("x_dtype", ""), row.get("precision", ""), row["impl"])
        newest[key] = row
    return list(newest.values())


def case_label(row: dict) -> str:
    label = f"{row['rows']}x{row['cols']}"
    if row["op"] in ("hessian_update", "sumsq_update"):
        return f"{label} {row.get('x_dtype', '')} {row.get('precision', '')}".strip()
    label += f" {row['pattern']}" + (f" w{row['wbits']}" if row["wbits"] not in ("", "0") else "")
    return label + (" tf32" if row.get("precision") == "tf32" else "")


def plot(rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", default=str(RESULTS / "prune.csv"))
    parser.add_argument("--device", default=None, help="only rows whose device name contains this")
    parser.add_argument("--out", default=str(RESULTS / "prune.png"))
    args = parser.parse_args(argv)
    print(f"wrote {plot(latest_rows(Path(args.csv), args.device), Path(args.out))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
