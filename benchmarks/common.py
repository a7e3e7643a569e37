"""Shared benchmark plumbing: timing medians with quantiles, and appending rows to results/*.csv.

``SPARSEKERN_RESULTS_DIR`` moves the results folder (``benchmarks/gpu_check.py`` collects one run's rows there)."""

from __future__ import annotations

import csv
import datetime
import functools
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(os.environ.get("SPARSEKERN_RESULTS_DIR") or Path(__file__).resolve().parent / "results")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@functools.cache  # the commit the run started from: a commit made while it runs is not what produced its rows
def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def measure(fn: Callable[[], object], device: torch.device, repeat: int = 5, warmup: int = 1) -> dict:
    """Median and 20/80% quantiles of ``fn``'s wall time in ms (synchronizing the GPU around each call)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    quantiles = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return {"median_ms": statistics.median(times), "p20_ms": quantiles[0], "p80_ms": quantiles[-1],
            "repeat": repeat}


def speedups(rows: list[dict], baseline: dict, time_key: str = "median_ms") -> None:
    """Give every row of one case the ``baseline`` it is compared with (its ``impl``) and its ``speedup`` =
    baseline time / its time, measured in the same run (the baseline's own row gets 1.0)."""
    for row in rows:
        row["baseline"] = baseline["impl"]
        row["speedup"] = baseline[time_key] / row[time_key]


def append_rows(name: str, rows: list[dict], device: torch.device) -> Path:
    """Append ``rows`` to results/<name>.csv with device, commit and date columns."""
    stamp = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
             "commit": commit(), "device": device_name(device), "torch": torch.__version__}
    return append_stamped(RESULTS / f"{name}.csv", [{**stamp, **row} for row in rows])


def append_stamped(path: Path, rows: list[dict]) -> Path:
    """Append rows that already carry their stamp columns to the CSV at ``path``.

    A row with columns the file lacks extends the header (the file is rewritten, old rows left blank there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old_rows, fields = [], []
    if path.exists() and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            old_rows = list(reader)
    for row in rows:
        fields += [k for k in row if k not in fields]
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(old_rows + rows)
    os.replace(tmp, path)  # atomic: a crash never leaves half a results file
    return path
