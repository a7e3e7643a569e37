"""sparsekern::cholesky_update (native CPU kernel, csrc/cholesky_update; and the reference) against refactorization
of R^T R +- X^T X: odd sizes, batch shapes, ranks, both dtypes; downdates back to the start; the failing downdate's
error; only the upper triangle is read."""

import pytest
import torch

from sparsekern import ops, reference
from sparsekern.reference import NotPositiveDefiniteError

IMPLEMENTATIONS = {
    "native": pytest.param(ops.cholesky_update, marks=pytest.mark.skipif(not ops.NATIVE, reason="_C not built")),
    "reference": reference.cholesky_update,
}
TOLERANCE = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def factor_and_rows(batch, n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, 3 * n + 2, n, dtype=torch.float64, generator=g)
    gram = x.mT @ x / x.shape[-2]
    rows = torch.randn(*batch, k, n, dtype=torch.float64, generator=g)
    return torch.linalg.cholesky(gram, upper=True), rows, gram


@pytest.mark.parametrize("update", IMPLEMENTATIONS.values(), ids=IMPLEMENTATIONS.keys())
@pytest.mark.parametrize("batch,n,k", [((), 1, 1), ((), 37, 3), ((3,), 5, 1), ((2, 2), 13, 16), ((4,), 130, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_update_and_downdate_match_refactorization(update, batch, n, k, dtype):
    upper, rows, gram = factor_and_rows(batch, n, k, dtype, seed=n * 10 + k)
    updated = update(upper.to(dtype), rows.to(dtype), False)
    assert updated.shape == upper.shape and updated.dtype == dtype
    assert torch.equal(updated, updated.triu())
    expected = torch.linalg.cholesky(gram + rows.mT @ rows, upper=True)
    torch.testing.assert_close(updated.double(), expected, **TOLERANCE[dtype])
    back = update(updated, rows.to(dtype), True)
    torch.testing.assert_close(back.double(), upper, **TOLERANCE[dtype])


@pytest.mark.parametrize("update", IMPLEMENTATIONS.values(), ids=IMPLEMENTATIONS.keys())
def test_a_downdate_that_breaks_positive_definiteness_is_refused(update):
    upper, rows, _ = factor_and_rows((3,), 8, 2, torch.float64)
    rows *= 0.01  # small enough to downdate by...
    rows[1, 1] *= 1e4  # ...but row 1 of batch entry 1
    with pytest.raises(NotPositiveDefiniteError, match=r"row 1 of x .* batch entry 1, column \d"):
        update(upper, rows, True)


@pytest.mark.parametrize("update", IMPLEMENTATIONS.values(), ids=IMPLEMENTATIONS.keys())
def test_reads_only_the_upper_triangle_and_leaves_its_inputs_alone(update):
    upper, rows, _ = factor_and_rows((2,), 9, 2, torch.float32)
    upper, rows = upper.float(), rows.float()
    junk = upper + torch.randn(2, 9, 9).tril(-1)
    before = junk.clone(), rows.clone()
    torch.testing.assert_close(update(junk, rows, False), update(upper, rows, False), rtol=0, atol=0)
    assert torch.equal(junk, before[0]) and torch.equal(rows, before[1])


def test_native_matches_reference_closely():
    if not ops.NATIVE:
        pytest.skip("_C not built")
    upper, rows, _ = factor_and_rows((5,), 70, 4, torch.float64, seed=3)
    torch.testing.assert_close(ops.cholesky_update(upper, rows, False), reference.cholesky_update(upper, rows, False),
                               rtol=1e-13, atol=1e-13)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., k, 4\]"):
        ops.cholesky_update(torch.eye(4), torch.randn(2, 5), False)
    with pytest.raises(ValueError, match="float32 or float64"):
        ops.cholesky_update(torch.eye(4, dtype=torch.float16), torch.randn(2, 4).half(), False)


def test_opcheck():
    upper, rows, _ = factor_and_rows((2,), 12, 3, torch.float32)
    for downdate in (False, True):
        torch.library.opcheck(torch.ops.sparsekern.cholesky_update.default,
                              (upper.float(), 0.01 * rows.float(), downdate))


@pytest.mark.gpu
def test_cuda_kernel_matches_cpu():
    upper, rows, _ = factor_and_rows((6,), 700, 5, torch.float32, seed=1)
    upper, rows = upper.float(), rows.float()
    for downdate, start in [(False, upper), (True, ops.cholesky_update(upper, rows, False))]:
        got = ops.cholesky_update(start.cuda(), rows.cuda(), downdate).cpu()
        torch.testing.assert_close(got, ops.cholesky_update(start, rows, downdate), rtol=1e-4, atol=1e-5)
    rows *= 0.01
    rows[2, 3] *= 1e5
    with pytest.raises(NotPositiveDefiniteError, match="batch entry 2"):
        ops.cholesky_update(upper.cuda(), rows.cuda(), True)
