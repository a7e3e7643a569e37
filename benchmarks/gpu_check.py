"""The project's whole GPU check in one run of at most 8 minutes: install (building sparsekern._C with CUDA), every
GPU test on compiled kernels, and a short version of every benchmark, each stage with its own time budget.

    make gpu-check PYTHON=python3 OUT=$OUT      # on the GPU machine (no network: torch, triton, ... are there)
    make gpu-check DRY=1                        # the same stages on the CPU interpreter with tiny shapes (CI)
    python benchmarks/gpu_check.py import OUT   # back here: the rows into benchmarks/results/*.csv, and the
                                                # dispatch table measured by the run into the user's cache

Stages, in order (budget in seconds; a stage may also use what the stages before it left unused, never past the
total): setup (pip install without dependencies, then the versions and the native build's devices), tests
(``pytest -m "gpu or configs"``: every GPU test, and every kernel configuration the launchers can pick, compiled
and run against the reference), prune-ops (bench_prune --quick at LLaMA-7B shapes), prune-model (SparseGPT on 2
decoder layers of a LLaMA-7B-shaped model; the whole model's time extrapolated and labelled so), gemm (the 2:4 layer
at M = 1, 16, 2048 at 7B shapes vs dense cuBLAS and cuSPARSELt, then the bitmap layer at 50% and 70% unstructured
sparsity at the same M and shapes vs dense cuBLAS; the dispatch table from those rows), cholesky (hinv_cholesky vs
the three-call sequence at n = 4096 and 28672) and decode (batch 1: the 2:4 7B-shaped model vs dense eagerly over
all 32 layers, then the 2:4 and the 70% unstructured (bitmap) models vs dense with the decode step in CUDA graphs
over 8 layers). A stage that overruns is cut (its process group killed) and reported; the rest still run.

OUT (default: a new temporary folder) receives at most 8 files: ``summary.md`` (stages, every target of the README's
performance table beside its measured figure or "not reached in time", the figures, failed tests, the dispatch
table), ``results.csv`` (every benchmark row, with its ``bench`` and its ``speedup`` over the baseline measured in
the same run) and one log per stage group (setup, tests, prune, gemm, cholesky, decode).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import functools
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
TOTAL_BUDGET_S = 470  # the 8 minutes, less the summary's own seconds
MIN_STEP_S = 5  # a step with less time than this left is not started
SUMMARY_LOG_LINES = 15


@dataclasses.dataclass
class Step:
    """One command of a stage: ``gpu`` argv on the GPU machine, ``dry`` argv in the dry run (None: skipped)."""

    gpu: list[str] | None
    dry: list[str] | None
    env: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Stage:
    name: str
    log: str  # stages that belong together share a log (OUT holds at most 8 files)
    budget_s: float
    steps: list[Step]


def _bench(script: str, *args: str) -> list[str]:
    return [sys.executable, str(BENCH / script), *args]


PYTEST = [sys.executable, "-m", "pytest", "-q", "tests", "-p", "no:cacheprovider", "-rfE", "--tb=short", "-m"]
# The dry run collects the GPU tests (they skip without a GPU) but leaves the kernel configurations to `make test`,
# which runs them under the interpreter anyway.
GPU_TESTS, DRY_TESTS = PYTEST + ["gpu or configs"], PYTEST + ["gpu"]
if importlib.util.find_spec("xdist"):  # compiling the kernels dominates: in 4 processes on the GPU machine's cores
    GPU_TESTS += ["-n", "4"]
COMPILED = {"TRITON_INTERPRET": "0", "SPARSEKERN_BACKEND": "cuda"}
INTERPRETED = {"TRITON_INTERPRET": "1", "SPARSEKERN_BACKEND": "interpret"}

STAGES = [
    Stage("setup", "setup", 100, [
        Step([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."], None),
        Step([sys.executable, __file__, "info"], [sys.executable, __file__, "info"]),
    ]),
    Stage("tests", "tests", 100, [Step(GPU_TESTS, DRY_TESTS, COMPILED)]),
    Stage("prune-ops", "prune", 45, [Step(
        _bench("bench_prune.py", "--shapes", "7b", "--quick", "--repeat", "3"),
        _bench("bench_prune.py", "--shapes", "tiny", "--device", "cpu", "--quick", "--repeat", "1"))]),
    Stage("prune-model", "prune", 45, [Step(
        _bench("bench_prune_model.py", "--config", "7b", "--layers", "2"),
        _bench("bench_prune_model.py", "--config", "tiny", "--layers", "1", "--nsamples", "2", "--seqlen", "16",
               "--device", "cpu"))]),
    Stage("gemm", "gemm", 65, [
        Step(_bench("bench_gemm.py", "--formats", "2:4", "--shapes", "7b", "--m", "1,16,2048", "--dtypes", "float16",
                    "--impls", "dense,cusparselt,cutlass,triton,dense_decompress,dispatched"),
             _bench("bench_gemm.py", "--formats", "2:4", "--shapes", "tiny", "--device", "cpu", "--m", "1,16,2048",
                    "--dtypes", "float32", "--impls", "dense,triton,dense_decompress,dispatched", "--repeat", "2")),
        Step(_bench("bench_gemm.py", "--formats", "bitmap", "--sparsities", "0.5,0.7", "--shapes", "7b", "--m",
                    "1,16,2048", "--dtypes", "float16", "--impls", "dense,triton,dense_decompress,dispatched"),
             # M = 2048 in the interpreter takes most of the stage's budget and tells nothing more
             _bench("bench_gemm.py", "--formats", "bitmap", "--sparsities", "0.5,0.7", "--shapes", "tiny", "--device",
                    "cpu", "--m", "1,16", "--dtypes", "float32", "--impls",
                    "dense,triton,dense_decompress,dispatched", "--repeat", "2")),
    ]),
    Stage("cholesky", "cholesky", 30, [Step(
        _bench("bench_cholesky.py", "--device", "cuda", "--sizes", "4096,28672", "--ops", "hinv", "--repeat", "3"),
        _bench("bench_cholesky.py", "--device", "cpu", "--quick", "--ops", "hinv", "--repeat", "2"))]),
    Stage("decode", "decode", 85, [
        Step(_bench("bench_e2e.py", "--config", "7b", "--patterns", "dense,2:4", "--batches", "1", "--prompt", "32",
                    "--new-tokens", "32", "--repeat", "3", "--no-compile"),
             _bench("bench_e2e.py", "--config", "tiny", "--patterns", "dense,2:4", "--device", "cpu", "--batches", "1",
                    "--prompt", "5", "--new-tokens", "3", "--repeat", "1", "--dtype", "float32", "--no-compile")),
        Step(_bench("bench_e2e.py", "--config", "7b", "--layers", "8", "--patterns", "dense,2:4,0.7", "--batches", "1",
                    "--prompt", "32", "--new-tokens", "64", "--repeat", "3", "--compile-backend", "cudagraphs"),
             _bench("bench_e2e.py", "--config", "tiny", "--layers", "1", "--patterns", "dense,2:4,0.7", "--device",
                    "cpu", "--batches", "1", "--prompt", "5", "--new-tokens", "3", "--repeat", "1", "--dtype",
                    "float32", "--compile-backend", "cudagraphs")),
    ]),
]


# -- running the stages -------------------------------------------------------------------------------------


@dataclasses.dataclass
class StageResult:
    name: str
    log: str
    budget_s: float
    status: str = "not started"
    elapsed_s: float = 0.0
    tail: list[str] = dataclasses.field(default_factory=list)


def _step_env(step: Step, dry: bool, results: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
           "SPARSEKERN_RESULTS_DIR": str(results), "SPARSEKERN_GPU_CHECK_INFO": str(results / "info.json"),
           # The tree itself comes first: the stages still run (on the reference Cholesky ops) if the install failed.
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for name in ("TRITON_INTERPRET", "SPARSEKERN_BACKEND"):  # the caller's choice must not leak into a stage
        env.pop(name, None)
    env.update(INTERPRETED if dry else step.env)
    if not dry:
        env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))  # the native build, in parallel
        arch = _cuda_arch()
        if arch:
            env.setdefault("TORCH_CUDA_ARCH_LIST", arch)  # compile for this GPU only
    return env


@functools.lru_cache(maxsize=None)
def _cuda_arch() -> str | None:
    """The GPU's compute capability (e.g. "9.0") from nvidia-smi: this process never initializes CUDA itself, so
    it holds no GPU memory while the stages run."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def _run(argv: list[str], env: dict, timeout_s: float, log) -> str:
    """Run one command into ``log`` (its own process group, killed whole when it overruns): its status."""
    log.write(f"$ {' '.join(argv)}\n")
    log.flush()
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        for sig, grace in [(signal.SIGTERM, 5), (signal.SIGKILL, 5)]:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        log.write(f"\n[gpu-check] cut after {timeout_s:.0f} s (the stage's budget)\n")
        return "cut"
    return "ok" if code == 0 else f"failed (exit {code})"


def run_stages(stages: list[Stage], out: Path, results: Path, dry: bool, total_s: float,
               say: Callable[[str], None] = print) -> list[StageResult]:
    """Each stage must end by its place in the cumulative schedule (the budgets of the stages so far, never past
    ``total_s``): time a stage leaves unused goes to the ones after it."""
    start = time.monotonic()
    scheduled = 0.0
    outcomes = []
    for stage in stages:
        scheduled = min(scheduled + stage.budget_s, total_s)
        outcome = StageResult(stage.name, f"{stage.log}.log", stage.budget_s)
        outcomes.append(outcome)
        steps = [s for s in stage.steps if (s.dry if dry else s.gpu)]
        stage_start = time.monotonic()
        with open(out / outcome.log, "a") as log:
            log.write(f"\n===== stage {stage.name} (budget {stage.budget_s:.0f} s) =====\n")
            log.flush()
            position = log.tell()
            statuses = []
            for step in steps:
                left = start + scheduled - time.monotonic()
                if left < MIN_STEP_S:
                    statuses.append("not reached in time")
                    log.write(f"[gpu-check] not started: {left:.0f} s left of the schedule\n")
                    continue
                statuses.append(_run(step.dry if dry else step.gpu, _step_env(step, dry, results), left, log))
        outcome.elapsed_s = time.monotonic() - stage_start
        outcome.status = next((s for s in statuses if s != "ok"), "ok") if statuses else "ok"
        if outcome.status != "ok":
            with open(out / outcome.log) as log:
                log.seek(position)
                outcome.tail = log.read().splitlines()[-SUMMARY_LOG_LINES:]
        say(f"[gpu-check] {stage.name:<12} {outcome.status:<20} {outcome.elapsed_s:6.1f} s "
            f"(budget {stage.budget_s:.0f} s, {time.monotonic() - start:5.0f} s so far)")
    return outcomes


# -- the figures and the targets ----------------------------------------------------------------------------


def read_rows(results: Path) -> dict[str, list[dict]]:
    """{bench name: rows} from the CSV files the benchmarks appended to in ``results``."""
    rows = {}
    for path in sorted(results.glob("*.csv")):
        with open(path, newline="") as f:
            rows[path.stem] = list(csv.DictReader(f))
    return rows


def _float(row: dict, key: str) -> float | None:
    try:
        return float(row[key])
    except (KeyError, TypeError, ValueError):
        return None


def _range(values: list[float], unit: str = "×") -> str:
    low, high = min(values), max(values)
    return f"{low:.2f}{unit}" if len(values) == 1 else f"{low:.2f}{unit} (min of {len(values)}; max {high:.2f}{unit})"


@dataclasses.dataclass
class Target:
    """One row of the README's performance table: its wording, its goal, and how a check's rows measure it.

    ``measure`` returns (figure, passed), or None when the check has no rows for it."""

    name: str
    goal: str
    stage: str
    measure: Callable[[dict[str, list[dict]], dict], tuple[str, bool] | None]


def _speedups(rows, goal, lower_is_better=False, key="speedup", unit="×"):
    values = [v for v in (_float(r, key) for r in rows) if v is not None]
    if not values:
        return None
    worst = max(values) if lower_is_better else min(values)
    return _range(values, unit), (worst <= goal if lower_is_better else worst >= goal)


def _tests(_rows, info):
    counts = info.get("tests")
    if not counts:
        return None
    figure = ", ".join(f"{n} {kind}" for kind, n in counts.items())
    return figure, counts.get("passed", 0) > 0 and not counts.get("failed") and not counts.get("error")


def _sparsegpt(rows, _info):
    return _speedups([r for r in rows.get("prune", []) if r["op"] == "sparsegpt_prune" and r["impl"] == "fused"
                      and r["baseline"] == "reference"], 20)


def _wanda_sort(rows, _info):
    return _speedups([r for r in rows.get("prune", []) if r["op"] == "wanda_prune" and r["impl"] == "fused"
                      and r["baseline"] == "sort"], 20)


def _wanda_floor(rows, _info):
    fused = [{"over_floor": float(r["median_ms"]) / float(r["floor_ms"])} for r in rows.get("prune", [])
             if r["op"] == "wanda_prune" and r["impl"] == "fused"]
    return _speedups(fused, 2.0, lower_is_better=True, key="over_floor", unit="× the floor")


def _lsq_floor(rows, _info):
    refit = [{"over_floor": float(r["median_ms"]) / float(r["floor_ms"])} for r in rows.get("prune", [])
             if r["op"] == "lsq_refit"]
    return _speedups(refit, 1.5, lower_is_better=True, key="over_floor", unit="× the floor")


def _model(rows, _info):
    fused = [r for r in rows.get("prune_model", []) if r["impl"] == "fused"]
    result = _speedups(fused, 5)
    if result and fused[-1].get("model_layers"):
        result = (f"{result[0]} ({fused[-1]['layers']} of {fused[-1]['model_layers']} layers)", result[1])
    return result


def _format(row: dict) -> str:
    return row.get("format") or "2:4"  # rows from before the bitmap format are 2:4's


def _sparsity(row: dict) -> float | None:
    value = _float(row, "sparsity")
    return None if value is None else round(value, 2)


def _gemm(impl, m_range, goal, fmt="2:4", sparsity=None):
    def measure(rows, _info):
        return _speedups([r for r in rows.get("gemm", []) if r["impl"] == impl and m_range(int(r["m"]))
                          and _format(r) == fmt and (sparsity is None or _sparsity(r) == sparsity)], goal)
    return measure


def _gemm_vs_cusparselt(rows, _info):
    by_case = {}
    for r in rows.get("gemm", []):
        if int(r["m"]) <= 16 and _format(r) == "2:4":
            by_case.setdefault((r["n"], r["k"], r["m"], r["dtype"]), {})[r["impl"]] = float(r["median_ms"])
    ratios = [c["cusparselt"] / c["triton"] for c in by_case.values() if "cusparselt" in c and "triton" in c]
    if not ratios:
        return ("cuSPARSELt not available in this PyTorch", False) if by_case else None
    return _range(ratios), min(ratios) > 1.0


def _decode(pattern, goal):
    def measure(rows, _info):
        sparse = [r for r in rows.get("e2e", []) if r["variant"] == "sparse" and r["batch"] == "1"
                  and (r.get("pattern") or "2:4") == pattern]  # rows from before the patterns are 2:4's
        if not sparse:
            return None
        compiled = [r for r in sparse if r["compiled"]]
        chosen = compiled[-1] if compiled else sparse[-1]
        labels = [f"{float(r['speedup']):.2f}× {'compiled (' + r['compiled'] + ')' if r['compiled'] else 'eager'}, "
                  f"{r['layers']} layers" for r in sparse]
        return "; ".join(labels), float(chosen["speedup"]) >= goal
    return measure


def _hinv(key, goal, lower_is_better):
    def measure(rows, _info):
        hinv = [r for r in rows.get("cholesky", []) if r["op"] == "hinv_cholesky" and r["impl"] != r["baseline"]]
        if not hinv:
            return None
        largest = max(int(r["n"]) for r in hinv)
        result = _speedups([r for r in hinv if int(r["n"]) == largest], goal, lower_is_better, key,
                           "×" if key == "speedup" else " n²")
        return result and (f"{result[0]} at n = {largest} ({hinv[-1]['impl']})", result[1])
    return measure


TARGETS = [
    Target("GPU tests, compiled kernels", "all pass", "tests", _tests),
    Target("SparseGPT per layer at 7B shapes, fused vs the reference loop", "≥ 20×", "prune-ops", _sparsegpt),
    Target("Wanda 50% at 7B shapes, fused vs the published per-row sort", "≥ 20×", "prune-ops", _wanda_sort),
    Target("Wanda at 7B shapes, time over its memory-bandwidth floor", "≤ 2×", "prune-ops", _wanda_floor),
    Target("Least-squares refit (--update lsq, 20 iterations) at 7B shapes, time over its fp32 GEMM floor", "≤ 1.5×",
           "prune-ops", _lsq_floor),
    Target("SparseGPT on a 7B-shaped model, fused vs the reference pipeline", "≥ 5×", "prune-model", _model),
    Target("2:4 GEMM at M ≤ 16, 7B shapes, fp16, vs dense cuBLAS", "≥ 1.5×", "gemm",
           _gemm("triton", lambda m: m <= 16, 1.5)),
    Target("2:4 GEMM at M ≤ 16 vs cuSPARSELt", "> 1×", "gemm", _gemm_vs_cusparselt),
    Target("2:4 layer (dispatched) at M ≥ 2048 vs dense cuBLAS", "≥ 1×", "gemm",
           _gemm("dispatched", lambda m: m >= 2048, 1.0)),
    Target("Bitmap GEMM at 50% unstructured, M = 1, 7B shapes, fp16, vs dense cuBLAS", "≥ 1.3×", "gemm",
           _gemm("triton", lambda m: m == 1, 1.3, "bitmap", 0.5)),
    Target("Bitmap GEMM at 70% unstructured, M = 1, 7B shapes, fp16, vs dense cuBLAS", "≥ 2.0×", "gemm",
           _gemm("triton", lambda m: m == 1, 2.0, "bitmap", 0.7)),
    Target("Decode tokens/s at batch 1, 2:4 7B-shaped model vs dense", "≥ 1.3×", "decode", _decode("2:4", 1.3)),
    Target("Decode tokens/s at batch 1, 70% unstructured (bitmap) 7B-shaped model vs dense", "≥ 1.5×", "decode",
           _decode("0.7", 1.5)),
    Target("hinv_cholesky vs the three-call sequence at n = 28672", "≥ 1.5×", "cholesky",
           _hinv("speedup", 1.5, False)),
    Target("hinv_cholesky peak extra memory at n = 28672", "≤ 1.5 n² fp32", "cholesky",
           _hinv("peak_extra_n2", 1.5, True)),
]


def parse_pytest(log_text: str) -> tuple[dict[str, int], list[str]]:
    """({"passed": n, "failed": n, ...} from pytest's last summary line, the FAILED/ERROR lines)."""
    counts = {}
    for line in reversed(log_text.splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", line)
        if found and (" in " in line or line.startswith("=")):
            counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in found}
            break
    failures = [line for line in log_text.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return counts, failures


# -- summary.md ---------------------------------------------------------------------------------------------

FIGURE_COLUMNS = {
    "prune": ["op", "rows", "cols", "pattern", "x_dtype", "precision", "impl", "median_ms", "baseline", "speedup",
              "floor_ms"],
    "prune_model": ["impl", "layers", "time_s", "per_layer_s", "extrapolated_model_s", "peak_gib", "speedup"],
    "gemm": ["format", "sparsity", "n", "k", "m", "dtype", "impl", "median_ms", "speedup"],
    "cholesky": ["op", "n", "impl", "median_ms", "speedup", "peak_extra_n2", "rel_err"],
    "e2e": ["pattern", "format", "compiled", "layers", "batch", "decode_tokens_per_s", "prefill_ms", "speedup"],
}


def _cell(value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return value
    if number.is_integer() and abs(number) < 1e6:
        return str(int(number))
    return f"{number:.3g}"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(row) + " |" for row in rows]


def summary(outcomes: list[StageResult], rows: dict[str, list[dict]], info: dict, dry: bool, wall_s: float,
            dispatch: list[dict]) -> str:
    lines = ["# sparsekern GPU check", ""]
    if dry:
        lines += ["**DRY RUN** on the CPU (Triton interpreter, tiny shapes): it checks that every stage still runs; "
                  "its figures are not GPU figures and its pass/fail means nothing.", ""]
    lines += [f"- device: {info.get('device', 'unknown (setup did not finish)')}",
              f"- versions: {info.get('versions', 'unknown')}",
              f"- sparsekern._C native kernels: {info.get('native', 'unknown')}",
              f"- commit {info.get('commit', 'unknown')}, "
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; wall {wall_s:.0f} s of the "
              f"{TOTAL_BUDGET_S} s budget", "", "## Stages", ""]
    lines += markdown_table(["stage", "status", "time (s)", "budget (s)", "log"], [
        [o.name, o.status, f"{o.elapsed_s:.0f}", f"{o.budget_s:.0f}", o.log] for o in outcomes])
    status = {o.name: o.status for o in outcomes}
    lines += ["", "## Targets (the README's performance table)", ""]
    target_rows = []
    for target in TARGETS:
        result = target.measure(rows, info)
        if result is None:
            stage_status = status.get(target.stage, "not started")
            figure = ("not reached in time" if stage_status in ("cut", "not reached in time", "not started")
                      else f"not measured (stage {target.stage}: {stage_status})")
            verdict = "—"
        else:
            figure, passed = result
            verdict = "pass" if passed else "FAIL"
        target_rows.append([target.name, target.goal, figure, verdict])
    lines += markdown_table(["target", "goal", "measured", "result"], target_rows)
    if info.get("failures"):
        lines += ["", "## Failed tests", "", "```", *info["failures"][:60], "```"]
    for bench, columns in FIGURE_COLUMNS.items():
        if not rows.get(bench):
            continue
        present = [c for c in columns if any(r.get(c) for r in rows[bench])]
        lines += ["", f"## {bench}", ""]
        lines += markdown_table(present, [[_cell(r.get(c, "")) for c in present] for r in rows[bench]])
    if dispatch:
        lines += ["", "## Dispatch table from the gemm rows (2:4 and bitmap)", "", "```json", "[",
                  ",\n".join(json.dumps(entry) for entry in dispatch), "]", "```"]
    for o in outcomes:
        if o.tail:
            lines += ["", f"## {o.name}: {o.status}, last lines of {o.log}", "", "```", *o.tail, "```"]
    return "\n".join(lines) + "\n"


def _dispatch_entries(gemm_rows: list[dict]) -> list[dict]:
    if not gemm_rows:
        return []
    sys.path.insert(0, str(ROOT))
    from sparsekern.bench import crossover_rules

    return crossover_rules(gemm_rows)


def write_results(rows: dict[str, list[dict]], path: Path, dry: bool) -> None:
    """Every row of every bench in one CSV, led by ``bench`` (its results file) and ``check`` (gpu or dry)."""
    fields = ["bench", "check"]
    for bench_rows in rows.values():
        for row in bench_rows:
            fields += [k for k in row if k not in fields]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        for bench, bench_rows in rows.items():
            writer.writerows({"bench": bench, "check": "dry" if dry else "gpu", **row} for row in bench_rows)


# -- subcommands --------------------------------------------------------------------------------------------


def cmd_run(args) -> int:
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="sparsekern-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: give the check an empty OUT folder")
    work = Path(tempfile.mkdtemp(prefix="sparsekern-gpu-check-rows-"))
    stages = [s for s in STAGES if not args.stages or s.name in args.stages.split(",")]
    print(f"[gpu-check] {'dry run, ' if args.dry else ''}{len(stages)} stages, budget {args.budget:.0f} s -> {out}",
          flush=True)
    start = time.monotonic()
    try:
        outcomes = run_stages(stages, out, work, args.dry, args.budget)
        rows = read_rows(work)
        info = json.loads((work / "info.json").read_text()) if (work / "info.json").exists() else {}
        info["commit"] = _commit()
        tests_log = out / "tests.log"
        if tests_log.exists():
            info["tests"], info["failures"] = parse_pytest(tests_log.read_text(errors="replace"))
        write_results(rows, out / "results.csv", args.dry)
        text = summary(outcomes, rows, info, args.dry, time.monotonic() - start,
                       _dispatch_entries(rows.get("gemm", [])))
        (out / "summary.md").write_text(text)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(text[:text.find("\n## ", text.find("## Targets") + 1)])  # up to the targets, for the reply's tail
    print(f"[gpu-check] wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
    return 0


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cmd_info(_args) -> int:
    """The setup stage's last step, run after the install in a fresh process: what the check runs on."""
    import torch
    import transformers
    import triton

    from sparsekern import ops

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = (f"{props.name}, {props.multi_processor_count} SMs, sm_{props.major}{props.minor}, "
                  f"{props.total_memory / 2**30:.0f} GiB")
    else:
        device = "no GPU (CPU)"
    info = {"device": device,
            "versions": f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
                        f"triton {triton.__version__}, transformers {transformers.__version__}",
            "native": "; ".join(f"{op} {', '.join(keys) or 'none (reference fallback)'}"
                                for op, keys in ops.NATIVE_KEYS.items())}
    print(json.dumps(info, indent=1))
    path = os.environ.get("SPARSEKERN_GPU_CHECK_INFO")
    if path:
        Path(path).write_text(json.dumps(info))
    return 0


def cmd_import(args) -> int:
    """A GPU check's rows into benchmarks/results/<bench>.csv and its measured dispatch table into the user's
    cache folder (``sparsekern.nn.dispatch.table_path()``)."""
    sys.path.insert(0, str(BENCH))
    from common import RESULTS, append_stamped

    with open(Path(args.out) / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if any(r["check"] != "gpu" for r in rows):
        raise SystemExit("these rows come from a dry run (CPU interpreter, tiny shapes): nothing to import")
    by_bench = {}
    for row in rows:
        bench = row.pop("bench")
        row.pop("check")
        by_bench.setdefault(bench, []).append({k: v for k, v in row.items() if v != ""})
    for bench, bench_rows in by_bench.items():
        print(f"appended {len(bench_rows)} rows to {append_stamped(RESULTS / f'{bench}.csv', bench_rows)}")
    entries = _dispatch_entries(by_bench.get("gemm", []))
    if entries:
        from sparsekern.bench import write_table

        print(f"wrote {len(entries)} dispatch entries to {write_table(entries)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the check")
    run.add_argument("--out", default=None, help="an empty folder for the files (default: a new temporary one)")
    run.add_argument("--dry", action="store_true", help="on the CPU: the Triton interpreter and tiny shapes")
    run.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help="seconds for all stages together")
    run.add_argument("--stages", default=None, help=f"comma-separated subset of {','.join(s.name for s in STAGES)}")
    sub.add_parser("info", help="(the setup stage's last step) print what the check runs on")
    imp = sub.add_parser("import", help="a check's rows into benchmarks/results, its dispatch table into the "
                                        "user's cache folder")
    imp.add_argument("out", help="the check's OUT folder (results.csv)")
    args = parser.parse_args(argv)
    return {"run": cmd_run, "info": cmd_info, "import": cmd_import}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
