"""Benchmark plumbing and the Cholesky benchmark's full case list (the other scripts run end to end in the GPU
check's dry run, tests/test_gpu_check.py)."""

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name):
    """A benchmark script as a module; ``common`` is imported the way the scripts import it (one module)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    if name == "common":
        return importlib.import_module("common")
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def results(tmp_path, monkeypatch):
    """Results go to a temporary folder, never into benchmarks/results."""
    monkeypatch.setattr(load("common"), "RESULTS", tmp_path)
    return tmp_path


def test_append_rows_extends_the_header(results):
    common = load("common")
    common.append_rows("t", [{"a": 1}], torch.device("cpu"))
    common.append_rows("t", [{"a": 2, "b": 3}], torch.device("cpu"))
    with open(results / "t.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["a"], r["b"]) for r in rows] == [("1", ""), ("2", "3")]


def test_bench_cholesky_quick_rows_and_plot(results, capsys):
    bench = load("bench_cholesky")
    assert bench.main(["--device", "cpu", "--quick", "--repeat", "2"]) == 0
    with open(results / "cholesky.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    cpu = torch.device("cpu")
    cases = [(r["op"], r["impl"], r["n"], r["batch"], r["k"], r["downdate"]) for r in rows]
    expected = [(op, i, str(n), "1", "", "") for n in (64, 96) for op, i in bench.hinv_cases(cpu)]
    for n, batch in ((64, 4), (96, 2)):
        expected += [("cholesky_update", i, str(n), str(batch), str(k), d) for k in (1, 4) for d in ("0", "1")
                     for i in ("refactor", bench.impl_name("cholesky_update", cpu))]
        expected += [("cholesky_delete", i, str(n), str(batch), "", "")
                     for i in ("refactor", bench.impl_name("cholesky_delete", cpu))]
    assert cases == expected
    for row in rows:
        assert float(row["median_ms"]) > 0 and float(row["rel_err"]) < 1e-4
        assert row["device"] and row["commit"] and row["date"] and row["torch"]
        baseline = "three-call" if row["op"].startswith("hinv") else "refactor"
        assert row["baseline"] == baseline and float(row["speedup"]) > 0
        assert (float(row["speedup"]) == 1.0) if row["impl"] == baseline else row["impl"] != baseline
        if row["op"].startswith("hinv"):
            assert int(row["peak_extra_bytes"]) >= 0
    assert capsys.readouterr().out.count("\n") == len(rows) + 2  # header, one line per row, "appended"
    out = results / "cholesky.png"
    assert load("plot").main(["--kind", "cholesky", "--csv", str(results / "cholesky.csv"), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000


def test_bench_resume_rows(results):
    bench = load("bench_resume")
    assert bench.main(["--sizes", "smollm2", "--nsamples", "2", "--seqlen", "16", "--repeat", "2"]) == 0
    with open(results / "resume.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["size"] == "smollm2" and int(row["input_bytes"]) >= 2 * 16 * 576 * 4
    assert 0 < float(row["blocking_ms"]) <= float(row["total_ms"])


def test_bench_quality_grid_and_summary(tmp_path):
    bench = load("bench_quality")
    args = bench.argparse.Namespace(preset=None, patterns="0.7,2:4", methods="sparsegpt,wanda", updates="none,obs",
                                    refines="none", allocations="uniform,owl", permute=True)
    runs = bench.grid(args)
    assert ("0.7", "sparsegpt", "obs", "none", "uniform", False) not in runs  # SparseGPT updates itself
    assert ("2:4", "wanda", "none", "none", "owl", False) not in runs  # no allocation for N:M
    assert ("0.7", "wanda", "none", "none", "uniform", True) not in runs  # no permutation for unstructured
    assert ("2:4", "wanda", "obs", "none", "uniform", True) in runs and ("0.7", "wanda", "obs", "none", "owl",
                                                                         False) in runs
    path = tmp_path / "quality.csv"
    rows = [("sparsegpt", "uniform", 0, 40.0), ("sparsegpt", "uniform", 1, 44.0), ("sparsegpt", "owl", 0, 36.0),
            ("sparsegpt", "owl", 1, 41.8)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["model", "pattern", "method", "update", "refine", "allocation", "permute", "seed",
                                    "perplexity", "prune_s"])
        writer.writeheader()
        for method, allocation, seed, ppl in rows:
            writer.writerow({"model": "m", "pattern": "0.7", "method": method, "update": "none", "refine": "none",
                             "allocation": allocation, "permute": "False", "seed": seed, "perplexity": ppl,
                             "prune_s": 10})
    table = bench.summary(path)
    owl = next(line for line in table.splitlines() if "| owl |" in line)
    uniform = next(line for line in table.splitlines() if "| uniform |" in line)
    assert "**38.90 ± 4.10 (2)**" in owl and "| 0.925 |" in owl  # mean of 36/40 and 41.8/44
    assert "42.00 ± 2.83 (2)" in uniform and "| 1.000 |" in uniform
