"""Triton calibration statistics (hessian_update, sumsq_update) under the interpreter, against the reference."""

import pytest
import torch

from sparsekern import ops, reference
from checks import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Odd sizes beside round ones: k = 5 and 37 fit one tile, 123 leaves a masked tail, 130 spills into a second tile.
COLUMNS = [5, 37, 123, 130]
# Streamed batches: m = 1, 7, 2 x 7 (leading dims) and 100 rows (more than one BLOCK_M step).
BATCHES = [(1,), (7,), (2, 7), (100,)]


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Tiles small enough that k = 37..130 spans several of them (mirrored tiles, masked tails)."""
    from sparsekern.triton_kernels import stats

    monkeypatch.setattr(stats, "INTERPRETER_HESSIAN_TILES", (32, 16))
    monkeypatch.setattr(stats, "INTERPRETER_SUMSQ_TILES", (16, 32))


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_fp32_close(got, expected, what):
    """fp32 accumulation-order differences, relative to the scale of the statistic."""
    assert_close(got, expected, what, atol=1e-5 * float(expected.abs().max()), rtol=1e-5)


def test_ops_dispatch_to_the_kernels(interpret):
    from sparsekern.triton_kernels import stats

    assert ops._implementation("hessian_update", torch.zeros(3, 3)) is stats.hessian_update
    assert ops._implementation("sumsq_update", torch.zeros(3)) is stats.sumsq_update


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", COLUMNS)
def test_hessian_update_streams_like_the_reference(interpret, dtype, k):
    hessian, expected, count, seen = torch.zeros(k, k), torch.zeros(k, k), 0, []
    for step, lead in enumerate(BATCHES):
        x = randn(*lead, k, dtype=dtype, seed=step)
        ops.hessian_update(hessian, x, count)
        count = reference.hessian_update(expected, x, count)
        seen.append(x.reshape(-1, k))
        assert_fp32_close(hessian, expected, f"H after batch {step} ({dtype}, k={k})")
        assert torch.equal(hessian, hessian.T), f"H after batch {step} is not exactly symmetric"
    data = torch.cat(seen).double()
    assert count == data.shape[0]
    assert_fp32_close(hessian, 2 / count * data.T @ data, f"H vs 2/n X^T X of all batches ({dtype}, k={k})")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", COLUMNS)
def test_sumsq_update_streams_like_the_reference(interpret, dtype, k):
    sumsq, expected, count, seen = torch.zeros(k), torch.zeros(k), 0, []
    for step, lead in enumerate(BATCHES):
        x = randn(*lead, k, dtype=dtype, seed=step)
        ops.sumsq_update(sumsq, x, count)
        count = reference.sumsq_update(expected, x, count)
        seen.append(x.reshape(-1, k))
        assert_fp32_close(sumsq, expected, f"sumsq after batch {step} ({dtype}, k={k})")
    data = torch.cat(seen).double()
    assert_fp32_close(sumsq, data.pow(2).mean(dim=0), f"sumsq vs mean of squares of all batches ({dtype}, k={k})")


@pytest.mark.parametrize("splits", [2, 3])
def test_sumsq_row_splits_add_up(interpret, monkeypatch, splits):
    """On a GPU the rows are split across programs (partial sums added in order); force that here."""
    from sparsekern.triton_kernels import stats

    monkeypatch.setattr(stats, "_row_splits", lambda *args: splits)
    x = randn(300, 37, dtype=torch.bfloat16)
    sumsq = torch.rand(37)
    expected = sumsq.clone()
    assert ops.sumsq_update(sumsq, x, 5) is None
    reference.sumsq_update(expected, x, 5)
    assert_fp32_close(sumsq, expected, f"sumsq with {splits} row splits")


def test_updates_continue_a_symmetric_statistic_and_return_the_count(interpret):
    """From a nonzero state and count (every element must be rewritten), through the launchers, which return
    count + m; ``input_precision="tf32"`` is accepted (the interpreter's dot is exact fp32 either way)."""
    k, start = 70, 9
    h0 = randn(k, k, seed=1)
    h0 = h0 + h0.T
    s0 = randn(k, seed=2).abs()
    x = randn(3, 11, k, seed=3)
    hessian_update = ops._implementation("hessian_update", h0)
    sumsq_update = ops._implementation("sumsq_update", s0)
    for precision in ["ieee", "tf32"]:
        hessian, expected = h0.clone(), h0.clone()
        assert hessian_update(hessian, x, start, input_precision=precision) == start + 33
        assert reference.hessian_update(expected, x, start) == start + 33
        assert_fp32_close(hessian, expected, f"H continued from count {start} ({precision})")
        assert torch.equal(hessian, hessian.T)
    sumsq, expected = s0.clone(), s0.clone()
    assert sumsq_update(sumsq, x, start) == reference.sumsq_update(expected, x, start) == start + 33
    assert_fp32_close(sumsq, expected, f"sumsq continued from count {start}")


def test_strided_inputs(interpret):
    """Leading dims that are a view (row stride > k), that need a copy (permuted), and a column stride != 1."""
    k = 37
    sliced = randn(2, 7, 50, seed=4)[:, :, :k]
    permuted = randn(7, 2, k, seed=5).permute(1, 0, 2)
    transposed = randn(k, 20, seed=6).T
    for name, x in [("sliced", sliced), ("permuted", permuted), ("transposed", transposed)]:
        hessian, expected = torch.zeros(k, k), torch.zeros(k, k)
        ops.hessian_update(hessian, x, 0)
        reference.hessian_update(expected, x, 0)
        assert_fp32_close(hessian, expected, f"H of a {name} x")
        sumsq, expected = torch.zeros(k), torch.zeros(k)
        ops.sumsq_update(sumsq, x, 0)
        reference.sumsq_update(expected, x, 0)
        assert_fp32_close(sumsq, expected, f"sumsq of a {name} x")


@pytest.mark.parametrize("shape", [(0, 12), (2, 0, 12)])
def test_no_rows_changes_nothing(interpret, shape):
    x = torch.empty(shape)
    h0 = randn(12, 12, seed=7)
    h0 = h0 + h0.T
    s0 = randn(12, seed=8).abs()
    hessian, sumsq = h0.clone(), s0.clone()
    assert ops._implementation("hessian_update", hessian)(hessian, x, 5) == 5
    assert ops._implementation("sumsq_update", sumsq)(sumsq, x, 5) == 5
    ops.hessian_update(hessian, x, 5)
    ops.sumsq_update(sumsq, x, 5)
    assert torch.equal(hessian, h0) and torch.equal(sumsq, s0)


@pytest.mark.parametrize("call, words", [
    (lambda f: f["hessian_update"](torch.zeros(5, 5), torch.randn(3, 6), 0), "hessian has shape"),
    (lambda f: f["hessian_update"](torch.zeros(6, 6).double(), torch.randn(3, 6), 0), "contiguous float32"),
    (lambda f: f["hessian_update"](torch.zeros(6, 12)[:, ::2], torch.randn(3, 6), 0), "contiguous float32"),
    (lambda f: f["hessian_update"](torch.zeros(6, 6), torch.randn(3, 6), 0, input_precision="tf64"),
     "input_precision"),
    (lambda f: f["sumsq_update"](torch.zeros(5), torch.randn(3, 6), 0), "sumsq has shape"),
    (lambda f: f["sumsq_update"](torch.zeros(6), torch.ones(3, 6, dtype=torch.int32), 0), "floating-point"),
])
def test_argument_errors(interpret, call, words):
    launchers = {name: ops._implementation(name, torch.zeros(1)) for name in ["hessian_update", "sumsq_update"]}
    with pytest.raises(ValueError, match=words):
        call(launchers)
