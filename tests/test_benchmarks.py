"""Benchmark plumbing, the Cholesky benchmark's full case list, and smoke runs of the format options (gemm's
bitmap rows and dispatch table, e2e's patterns, the checkpoint benchmark) on tiny shapes (the other scripts run
end to end in the GPU check's dry run, tests/test_gpu_check.py)."""

import csv
import importlib.util
import json
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
                                    refines="none", allocations="uniform,owl", permute=True, true_sequential="no,yes")
    runs = bench.grid(args)
    assert ("0.7", "sparsegpt", "obs", "none", "uniform", False, False) not in runs  # SparseGPT updates itself
    assert ("2:4", "wanda", "none", "none", "owl", False, False) not in runs  # no allocation for N:M
    assert ("0.7", "wanda", "none", "none", "uniform", True, False) not in runs  # no permutation for unstructured
    assert ("2:4", "wanda", "obs", "none", "uniform", True, False) in runs and ("0.7", "wanda", "obs", "none", "owl",
                                                                                False, False) in runs
    assert ("0.7", "sparsegpt", "none", "none", "uniform", False, True) in runs  # both orders
    args.methods, args.true_sequential = "magnitude", "yes"
    assert bench.grid(args) == [("0.7", "magnitude", "obs", "none", "uniform", False, True),
                                ("0.7", "magnitude", "obs", "none", "owl", False, True),
                                ("2:4", "magnitude", "obs", "none", "uniform", False, True),
                                ("2:4", "magnitude", "obs", "none", "uniform", True, True)]  # data-free alone: no order
    path = tmp_path / "quality.csv"
    rows = [("sparsegpt", "uniform", 0, 40.0, ""), ("sparsegpt", "uniform", 1, 44.0, "False"),
            ("sparsegpt", "owl", 0, 36.0, "False"), ("sparsegpt", "owl", 1, 41.8, "False"),
            ("sparsegpt", "uniform", 0, 38.0, "True")]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["model", "pattern", "method", "update", "refine", "allocation", "permute", "seed",
                                    "perplexity", "prune_s", "true_sequential"])
        writer.writeheader()
        for method, allocation, seed, ppl, sequential in rows:
            writer.writerow({"model": "m", "pattern": "0.7", "method": method, "update": "none", "refine": "none",
                             "allocation": allocation, "permute": "False", "seed": seed, "perplexity": ppl,
                             "prune_s": 10, "true_sequential": sequential})
    table = bench.summary(path)
    owl = next(line for line in table.splitlines() if "| owl |" in line)
    uniform = next(line for line in table.splitlines() if "| uniform | - | - |" in line)
    sequential = next(line for line in table.splitlines() if "| true-seq |" in line)
    assert "**38.90 ± 4.10 (2)**" in owl and "| 0.925 |" in owl  # mean of 36/40 and 41.8/44
    assert "42.00 ± 2.83 (2)" in uniform and "| 1.000 |" in uniform  # a blank order is the default one
    assert "38.00 (1)" in sequential and "| 0.950 |" in sequential and "**" not in sequential  # one seed: no win
    out = tmp_path / "quality.png"
    assert load("plot").main(["--kind", "quality", "--csv", str(path), "--out", str(out)]) == 0
    assert out.stat().st_size > 0


def test_bench_quality_preset_patterns_and_skip_measured(tmp_path):
    bench = load("bench_quality")
    args = bench.argparse.Namespace(preset="headline", patterns="0.7,2:4")
    runs = bench.grid(args)
    assert {run[0] for run in runs} == {"0.7", "2:4"} and ("2:4", "sparsegpt", "none", "none", "uniform", True,
                                                           False) in runs
    path = tmp_path / "quality.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["model", "pattern", "method", "update", "refine", "allocation", "permute", "seed",
                                    "nsamples", "seqlen", "fit_windows"])
        writer.writeheader()
        base = {"model": "m", "pattern": "0.7", "method": "sparsegpt", "update": "none", "refine": "none",
                "nsamples": 16, "seqlen": 256}
        writer.writerow({**base, "allocation": "uniform", "permute": "", "seed": 0, "fit_windows": ""})
        writer.writerow({**base, "allocation": "sensitivity", "permute": "False", "seed": 0, "fit_windows": ""})
        writer.writerow({**base, "allocation": "sensitivity", "permute": "False", "seed": 1, "fit_windows": 4})
    done = bench.measured(path)
    assert ("m", "0.7", "sparsegpt", "none", "none", "uniform", False, False, 0, 16, 256) in done
    # a sensitivity row from before the fit windows were recorded is measured again
    assert ("m", "0.7", "sparsegpt", "none", "none", "sensitivity", False, False, 0, 16, 256) not in done
    assert ("m", "0.7", "sparsegpt", "none", "none", "sensitivity", False, False, 1, 16, 256) in done
    assert ("m", "0.7", "sparsegpt", "none", "none", "sensitivity", False, True, 1, 16, 256) not in done


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_prune_by_magnitude_per_row_and_nm():
    from sparsekern.bench import prune_by_magnitude, random_unstructured

    weight = random_unstructured(6, 40, 0.7, torch.float32, torch.device("cpu"))
    assert ((weight == 0).sum(1) == 28).all()  # round(0.7 * 40) of every row
    kept = weight.abs().masked_fill(weight == 0, float("inf")).amin(1)
    dropped = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)).abs().masked_fill(weight != 0, 0).amax(1)
    assert (dropped <= kept).all()  # the smallest magnitudes went
    decoder = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([torch.nn.Linear(16, 8)])})
    model = torch.nn.ModuleDict({"model": decoder, "head": torch.nn.Linear(16, 8)})
    assert prune_by_magnitude(model, "2:4") == 1
    groups = (decoder["layers"][0].weight.reshape(8, 4, 4) != 0).sum(-1)
    assert (groups == 2).all() and (model["head"].weight != 0).all()  # only the decoder linears (".layers.")


def test_bench_gemm_bitmap_rows_and_the_dispatch_table_in_the_cache(results, interpret, tmp_path, monkeypatch, capsys):
    from sparsekern.nn import dispatch

    monkeypatch.setenv("SPARSEKERN_CACHE", str(tmp_path / "cache"))
    bench = load("bench_gemm")
    assert bench.main(["--shapes", "tiny", "--device", "cpu", "--m", "1,17", "--dtypes", "float32", "--sparsities",
                       "0.5,0.7", "--repeat", "1", "--write-table"]) == 0
    rows = read(results / "gemm.csv")
    cases = {(r["format"], float(r["sparsity"])) for r in rows}
    assert cases == {("2:4", 0.5), ("bitmap", 0.5), ("bitmap", 0.7)}
    for fmt, sparsity in cases:
        impls = {r["impl"] for r in rows if (r["format"], float(r["sparsity"])) == (fmt, sparsity)}
        assert impls == {"dense", "triton", "dense_decompress", "dispatched"}, (fmt, impls)
    assert all(float(r["speedup"]) > 0 and r["baseline"] == "dense" for r in rows)
    table = tmp_path / "cache" / "dispatch_table.json"
    assert f"to {table}" in capsys.readouterr().out
    entries = json.loads(table.read_text())["entries"]
    assert sorted((e["format"], e["sparsity"]) for e in entries) == [("2:4", None), ("bitmap", 0.5), ("bitmap", 0.7)]
    dispatch.clear_caches()
    with pytest.raises(SystemExit):
        bench.main(["--shapes", "tiny", "--device", "cpu", "--formats", "csr", "--no-save"])


def test_bench_e2e_patterns_rows(results):
    bench = load("bench_e2e")
    assert bench.main(["--config", "tiny", "--device", "cpu", "--no-compile", "--patterns", "2:4,0.5,0.7",
                       "--batches", "1", "--prompt", "4", "--new-tokens", "2", "--repeat", "1",
                       "--dtype", "float32"]) == 0
    rows = read(results / "e2e.csv")
    assert [(r["pattern"], r["variant"], r["format"]) for r in rows] == [
        ("dense", "dense", "dense"), ("2:4", "sparse", "2:4"), ("0.5", "sparse", "bitmap"),
        ("0.7", "sparse", "bitmap")]  # dense always comes first: the baseline
    assert float(rows[0]["speedup"]) == 1.0 and all(r["baseline"] == "dense" for r in rows)
    sizes = [float(r["weights_gib"]) for r in rows]
    assert sizes[3] < sizes[2] < sizes[0] and sizes[1] < sizes[0]


def test_bench_checkpoint_sizes_and_load_times(results):
    bench = load("bench_checkpoint")
    assert bench.main(["--models", "tiny", "--patterns", "0.5,0.7,2:4", "--repeat", "1"]) == 0
    rows = {r["pattern"]: r for r in read(results / "checkpoint.csv")}
    assert list(rows) == ["0.5", "0.7", "2:4"]
    assert [rows[p]["formats"] for p in rows] == ["bitmap:14", "bitmap:14", "2:4:14"]
    ratio = {p: float(r["pruned_ratio"]) for p, r in rows.items()}
    # fp16 bitmap: 2(1 - s) + 5/32 bytes a weight, padded to whole 128-column tiles (the tiny model is 64 wide)
    assert 0.55 < ratio["0.5"] < 0.6 and 0.35 < ratio["0.7"] < 0.4 and ratio["2:4"] == pytest.approx(0.5625)
    for row in rows.values():
        assert int(row["stored_linear_bytes"]) < int(row["dense_linear_bytes"])
        assert float(row["ratio"]) > float(row["pruned_ratio"])  # the dense lm_head counts on both sides
        assert int(row["compressed_file_bytes"]) < int(row["dense_file_bytes"])
        assert float(row["dense_load_ms"]) > 0 and float(row["compressed_load_ms"]) > 0 and float(row["speedup"]) > 0
    with pytest.raises(SystemExit):
        bench.main(["--models", "tiny", "--patterns", "1.5", "--no-save"])


def test_zero_shot_cloze_items_and_summary(tmp_path):
    bench = load("bench_zero_shot")
    documents = ["Alpha one two three four five. Alpha six seven eight nine ten. Alpha eleven twelve thirteen fourteen fifteen.", "Short one.",
                 "Beta one two three four five. Beta six seven eight nine ten.",
                 "Gamma one two three four five. Gamma six seven eight nine ten.",
                 "Delta one two three four five six. Delta seven eight nine ten eleven."]
    assert bench.sentences(documents[0])[1] == "Alpha six seven eight nine ten."
    items = bench.cloze_items(documents, 100, seed=3)
    assert len(items) == 5  # every consecutive pair of sentences of an article (of 6 to 40 words)
    for item in items:
        answer = item["choices"][item["label"]]
        assert len(item["choices"]) == bench.CHOICES and answer.split()[0] == item["context"].split()[0]
        # the distractors come from other articles
        assert all(c.split()[0] != answer.split()[0] for i, c in enumerate(item["choices"]) if i != item["label"])
    assert bench.cloze_items(documents, 100, seed=3) == items and len(bench.cloze_items(documents, 2)) == 2
    path = tmp_path / "zero_shot.csv"
    fields = ["model", "pattern", "method", "allocation", "permute", "seed", "acc", "acc_stderr", "acc_norm",
              "perplexity"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerow(dict(zip(fields, ["m", "0.7", "sparsegpt", "uniform", "False", 0, 0.30, 0.02, 0.31, 90])))
        writer.writerow(dict(zip(fields, ["m", "0.7", "sparsegpt", "uniform", "False", 1, 0.40, 0.03, 0.33, 110])))
        writer.writerow(dict(zip(fields, ["m", "dense", "-", "-", "False", "", 0.5, 0.02, 0.6, 20])))
    lines = bench.summary(path).splitlines()
    assert "| m | dense | - | - |" in lines[2]  # dense first
    # rows from before the update column ran no update
    assert "| m | 0.7 | sparsegpt | none | uniform | - | 0.350 ± 0.030 | 0.320 | 100.00 | 2 |" in lines[3]
    assert bench.measured(path) >= {("m", "0.7", "sparsegpt", "none", "uniform", False, 0),
                                    ("m", "dense", "-", "-", "-", False, None)}
