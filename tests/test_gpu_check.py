"""`make gpu-check DRY=1`: the GPU check's stages on the CPU (Triton interpreter, tiny shapes), so the script
cannot rot while no GPU is at hand; plus its budget mechanics, its summary against the README's performance
table, and bringing a check's rows home (``gpu_check.py import``)."""

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

FILES = {"summary.md", "results.csv", "setup.log", "tests.log", "prune.log", "gemm.log", "cholesky.log",
         "decode.log"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "run", "--dry", "--out",
                           str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return out, rows, done.stdout, time.monotonic() - started


def test_dry_run_writes_eight_files_and_every_stage_runs(dry_run):
    out, _, stdout, _ = dry_run
    assert {p.name for p in out.iterdir()} == FILES
    text = (out / "summary.md").read_text()
    assert "DRY RUN" in text
    for stage in gpu_check.STAGES:
        assert f"| {stage.name} | ok |" in text, text
    assert "## Targets" in stdout  # the reply's tail shows the stages and the targets


def test_every_row_carries_its_speedup_over_a_baseline_of_the_same_run(dry_run):
    _, rows, _, _ = dry_run
    assert {r["bench"] for r in rows} == {"prune", "prune_model", "gemm", "cholesky", "e2e"}
    for row in rows:
        assert row["check"] == "dry" and row["baseline"] and float(row["speedup"]) > 0, row
        assert row["date"] and row["commit"] and row["device"]
    prune = [r for r in rows if r["bench"] == "prune"]
    assert {(r["op"], r["impl"]) for r in prune} >= {(op, impl) for op in ["sparsegpt_prune", "wanda_prune",
                                                                           "magnitude_prune", "hessian_update",
                                                                           "sumsq_update"]
                                                     for impl in ["reference", "fused"]}
    wanda = [r for r in prune if r["op"] == "wanda_prune" and r["pattern"] == "0.5"]
    assert {r["baseline"] for r in wanda} == {"sort"} and all(
        r["speedup_vs_reference"] for r in wanda if r["impl"] == "fused")
    assert all(float(r["floor_ms"]) > 0 for r in prune)
    model = [r for r in rows if r["bench"] == "prune_model"]
    assert [r["impl"] for r in model] == ["reference", "fused"]
    assert all(float(r["extrapolated_model_s"]) == pytest.approx(float(r["per_layer_s"]) * 2) for r in model)
    gemm = [r for r in rows if r["bench"] == "gemm"]
    assert {r["impl"] for r in gemm} == {"dense", "triton", "dense_decompress", "dispatched"}
    assert {r["m"] for r in gemm} == {"1", "16", "2048"}
    assert {(r["format"], float(r["sparsity"])) for r in gemm} == {("2:4", 0.5), ("bitmap", 0.5), ("bitmap", 0.7)}
    e2e = [r for r in rows if r["bench"] == "e2e"]
    assert [(r["pattern"], r["variant"], r["format"], r["layers"]) for r in e2e] == [
        ("dense", "dense", "dense", "2"), ("2:4", "sparse", "2:4", "2"), ("dense", "dense", "dense", "1"),
        ("2:4", "sparse", "2:4", "1"), ("0.7", "sparse", "bitmap", "1")]
    # the compressed weights are smaller: 2:4 than dense, the 70% bitmap than 2:4
    assert float(e2e[1]["weights_gib"]) < float(e2e[0]["weights_gib"])
    assert float(e2e[4]["weights_gib"]) < float(e2e[3]["weights_gib"]) < float(e2e[2]["weights_gib"])


def readme_targets():
    """(target, goal) rows of the README's performance table."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Performance targets"):]
    section = section[:section.index("\n## ", 5)]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ")]
    return [(cells[0].strip(), cells[1].strip()) for cells in rows[1:]]


def test_summary_has_every_target_of_the_readme_with_a_figure(dry_run):
    out, _, _, _ = dry_run
    assert readme_targets() == [(t.name, t.goal) for t in gpu_check.TARGETS]
    text = (out / "summary.md").read_text()
    for target in gpu_check.TARGETS:
        line = next(line for line in text.splitlines() if line.startswith(f"| {target.name} |"))
        figure = line.split("|")[3].strip()
        assert figure and not figure.startswith("not reached"), line  # every stage ran in the dry run
    assert "## Dispatch table from the gemm rows (2:4 and bitmap)" in text


def test_plots_and_dispatch_table_from_the_check_rows(dry_run, tmp_path):
    from sparsekern import bench
    from sparsekern.nn import dispatch

    _, rows, _, _ = dry_run
    plot = __import__("plot")
    for bench_name, kind in [("prune", "prune"), ("gemm", "gemm"), ("cholesky", "cholesky")]:
        selected = [{k: v for k, v in r.items() if v != ""} for r in rows if r["bench"] == bench_name]
        path = tmp_path / f"{bench_name}.csv"
        fields = list(dict.fromkeys(k for r in selected for k in r))
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(selected)
        out = tmp_path / f"{bench_name}.png"
        assert plot.main(["--kind", kind, "--csv", str(path), "--out", str(out)]) == 0
        assert out.stat().st_size > 10_000
    entries = bench.crossover_rules([r for r in rows if r["bench"] == "gemm"])
    # one entry per format and sparsity: 2:4 (sparsity null), the bitmap at 50% and 70%
    assert sorted((e["format"], e["sparsity"]) for e in entries) == [("2:4", None), ("bitmap", 0.5), ("bitmap", 0.7)]
    for entry in entries:
        assert entry["rules"][-1][0] is None
        assert {impl for _, impl in entry["rules"]} <= set(dispatch.IMPLS)
    table = tmp_path / "table.json"
    bench.write_table(entries, table)
    bench.write_table(entries, table)  # the same key replaces, not duplicates
    assert len(json.loads(table.read_text())["entries"]) == 3


def test_import_brings_gpu_rows_home_and_refuses_dry_ones(dry_run, tmp_path, monkeypatch):
    import common

    from sparsekern.nn import dispatch

    out, rows, _, _ = dry_run
    with pytest.raises(SystemExit, match="dry run"):
        gpu_check.main(["import", str(out)])
    # The same rows as a GPU check would have written them.
    fake = tmp_path / "check"
    fake.mkdir()
    with open(fake / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "check": "gpu"} for r in rows)
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    monkeypatch.setenv("SPARSEKERN_CACHE", str(tmp_path))
    assert gpu_check.main(["import", str(fake)]) == 0
    for name in ["prune", "prune_model", "gemm", "cholesky", "e2e"]:
        with open(tmp_path / "results" / f"{name}.csv", newline="") as f:
            imported = list(csv.DictReader(f))
        assert len(imported) == sum(r["bench"] == name for r in rows)
        assert "bench" not in imported[0] and "check" not in imported[0]
    assert len(json.loads((tmp_path / "dispatch_table.json").read_text())["entries"]) == 3


def test_a_stage_over_budget_is_cut_with_its_processes_and_the_rest_still_run(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "MIN_STEP_S", 1)
    pid_file = tmp_path / "child.pid"
    quick = gpu_check.Stage("quick", "a", 2, [gpu_check.Step(None, [sys.executable, "-c", "print('hello')"])])
    # Its unused time goes to the next stage: cut at about 5 s, not 3.
    slow = gpu_check.Stage("slow", "b", 3, [gpu_check.Step(
        None, ["sh", "-c", f"sleep 120 & echo $! > {pid_file}; wait"])])
    late = gpu_check.Stage("late", "b", 1, [gpu_check.Step(None, [sys.executable, "-c", "print('never')"])])
    (tmp_path / "out").mkdir()
    started = time.monotonic()
    outcomes = gpu_check.run_stages([quick, slow, late], tmp_path / "out", tmp_path, dry=True, total_s=5.6,
                                    say=lambda line: None)
    assert 4 < time.monotonic() - started < 15
    assert [o.status for o in outcomes] == ["ok", "cut", "not reached in time"]
    assert outcomes[1].elapsed_s > 4
    assert any("cut after" in line for line in outcomes[1].tail)
    child = int(pid_file.read_text())
    for _ in range(50):  # the stage's whole process group went with it
        if not alive(child):
            break
        time.sleep(0.1)
    assert not alive(child), f"pid {child} outlived its stage"
    assert "hello" in (tmp_path / "out" / "a.log").read_text()
    assert "never" not in (tmp_path / "out" / "b.log").read_text()


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for a reaper (PID 1 of a container may never reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_pytest_summary_is_parsed():
    log = "\n".join(["FAILED tests/test_a.py::test_x[1] - AssertionError: no", "ERROR tests/test_b.py::test_y",
                     "2 failed, 40 passed, 3 skipped, 1 error, 700 deselected in 81.20s (0:01:21)"])
    counts, failures = gpu_check.parse_pytest(log)
    assert counts == {"failed": 2, "passed": 40, "skipped": 3, "error": 1, "deselected": 700}
    assert failures == ["FAILED tests/test_a.py::test_x[1] - AssertionError: no", "ERROR tests/test_b.py::test_y"]
    assert gpu_check._tests({}, {"tests": counts})[1] is False
    assert gpu_check._tests({}, {"tests": {"passed": 48}})[1] is True


def test_make_target_runs_the_script():
    dry = subprocess.run(["make", "-n", "gpu-check", "DRY=1", f"PYTHON={sys.executable}", "OUT=/tmp/x"],
                         capture_output=True, text=True, cwd=ROOT)
    assert "benchmarks/gpu_check.py run --dry --out /tmp/x" in dry.stdout, dry.stdout + dry.stderr
    gpu = subprocess.run(["make", "-n", "gpu-check", "PYTHON=python3"], capture_output=True, text=True, cwd=ROOT)
    assert "python3 benchmarks/gpu_check.py run" in gpu.stdout and "pip install" not in gpu.stdout, gpu.stdout
