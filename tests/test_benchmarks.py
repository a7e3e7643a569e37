"""The benchmark scripts run end to end on tiny shapes (the interpreter stands in for the GPU), write well-formed
CSV rows, and plot them."""

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

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


def test_bench_prune_rows_and_plot(results, interpret, capsys):
    bench = load("bench_prune")
    assert bench.main(["--shapes", "tiny", "--device", "cpu", "--repeat", "1"]) == 0
    with open(results / "prune.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ops = {(r["op"], r["impl"]) for r in rows}
    for op in ["sparsegpt_prune", "wanda_prune", "magnitude_prune", "hessian_update", "sumsq_update"]:
        assert (op, "reference") in ops and (op, "fused") in ops
    for row in rows:
        assert float(row["median_ms"]) > 0 and float(row["floor_ms"]) > 0
        assert row["device"] and row["commit"] and row["date"]
        if row["impl"] == "fused" and row["speedup"]:
            assert float(row["speedup"]) > 0
    out = results / "prune.png"
    assert load("plot").main(["--csv", str(results / "prune.csv"), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000


def test_append_rows_extends_the_header(results):
    common = load("common")
    import torch

    common.append_rows("t", [{"a": 1}], torch.device("cpu"))
    common.append_rows("t", [{"a": 2, "b": 3}], torch.device("cpu"))
    with open(results / "t.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["a"], r["b"]) for r in rows] == [("1", ""), ("2", "3")]


@pytest.mark.slow
def test_bench_prune_model_tiny(results, interpret):
    bench = load("bench_prune_model")
    assert bench.main(["--config", "tiny", "--nsamples", "2", "--seqlen", "16", "--device", "cpu"]) == 0
    with open(results / "prune_model.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["impl"] for r in rows] == ["reference", "fused"]
    assert all(abs(float(r["sparsity"]) - 0.5) < 1e-3 for r in rows)


def test_bench_e2e_tiny(results):
    bench = load("bench_e2e")
    assert bench.main(["--config", "tiny", "--device", "cpu", "--no-compile", "--new-tokens", "3", "--prompt", "5",
                       "--dtype", "float32", "--repeat", "1", "--batches", "1,2"]) == 0
    with open(results / "e2e.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["variant"], r["batch"]) for r in rows] == [("dense", "1"), ("dense", "2"), ("sparse", "1"),
                                                           ("sparse", "2")]
    assert all(float(r["decode_tokens_per_s"]) > 0 for r in rows) and rows[2]["decode_speedup"]
    assert float(rows[2]["weights_gib"]) < float(rows[0]["weights_gib"])  # compressed 2:4 weights are smaller


def test_bench_gemm_rows_table_and_plot(results, interpret, tmp_path, monkeypatch):
    from sparsekern import bench as gemm_bench
    from sparsekern.nn import dispatch

    bench = load("bench_gemm")
    assert bench.main(["--shapes", "tiny", "--device", "cpu", "--m", "1,17", "--dtypes", "float32"]) == 0
    with open(results / "gemm.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["impl"] for r in rows} >= {"dense", "triton", "dense_decompress", "dispatched"}
    assert all(float(r["median_ms"]) > 0 and float(r["speedup_vs_dense"]) > 0 for r in rows)
    entries = gemm_bench.crossover_rules(rows)
    assert len(entries) == 1 and entries[0]["rules"][-1][0] is None
    assert {impl for _, impl in entries[0]["rules"]} <= set(dispatch.IMPLS)
    table = tmp_path / "table.json"
    gemm_bench.write_table(entries, table)
    gemm_bench.write_table(entries, table)  # the same key replaces, not duplicates
    assert len(__import__("json").loads(table.read_text())["entries"]) == 1
    out = results / "gemm.png"
    assert load("plot").main(["--kind", "gemm", "--csv", str(results / "gemm.csv"), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000


def test_bench_cholesky_quick_rows_and_plot(results, capsys):
    bench = load("bench_cholesky")
    assert bench.main(["--device", "cpu", "--quick", "--repeat", "2"]) == 0
    with open(results / "cholesky.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    impl = bench.IMPL
    cases = [(r["op"], r["impl"], r["n"], r["batch"], r["k"], r["downdate"]) for r in rows]
    expected = [(op, i, str(n), "1", "", "") for n in (64, 96) for op, i in bench.HINV]
    for n, batch in ((64, 4), (96, 2)):
        expected += [("cholesky_update", i, str(n), str(batch), str(k), d) for k in (1, 4) for d in ("0", "1")
                     for i in ("refactor", impl)]
        expected += [("cholesky_delete", i, str(n), str(batch), "", "") for i in ("refactor", impl)]
    assert cases == expected
    for row in rows:
        assert float(row["median_ms"]) > 0 and float(row["rel_err"]) < 1e-4
        assert row["device"] and row["commit"] and row["date"] and row["torch"]
        assert (row["speedup"] != "") == (row["impl"] == impl)
        if row["op"].startswith("hinv"):
            assert int(row["peak_extra_bytes"]) >= 0
    assert capsys.readouterr().out.count("\n") == len(rows) + 2  # header, one line per row, "appended"
    out = results / "cholesky.png"
    assert load("plot").main(["--kind", "cholesky", "--csv", str(results / "cholesky.csv"), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
