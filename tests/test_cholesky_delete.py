"""sparsekern::cholesky_delete (native CPU kernel, csrc/cholesky_delete; and the reference): for U the upper
factor of H^-1, deleting input q must give the upper factor of (H without q)^-1, and the dropped row d must
satisfy d * d[q] = H^-1[q, :] (exact OBS elimination). Checked against refactorization of the reduced matrix."""

import pytest
import torch

from sparsekern import ops, reference

IMPLEMENTATIONS = {
    "native": pytest.param(ops.cholesky_delete, marks=pytest.mark.skipif(not ops.NATIVE, reason="_C not built")),
    "reference": reference.cholesky_delete,
}
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def hessians(batch, n, seed=0):
    x = torch.randn(*batch, 3 * n + 2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return x.mT @ x / x.shape[-2]


def check_against_refactorization(got, dropped, hessian, index, dtype):
    inverse = torch.linalg.inv(hessian)
    for b in range(hessian.shape[0]):
        q = int(index[b])
        keep = [j for j in range(hessian.shape[-1]) if j != q]
        expected = torch.linalg.cholesky(torch.linalg.inv(hessian[b][keep][:, keep]), upper=True)
        torch.testing.assert_close(got[b].double(), expected, **TOLERANCE[dtype])
        assert torch.equal(got[b], got[b].triu()) and (torch.diagonal(got[b]) > 0).all()
        torch.testing.assert_close((dropped[b] * dropped[b, q]).double(), inverse[b, q], **TOLERANCE[dtype])


@pytest.mark.parametrize("delete", IMPLEMENTATIONS.values(), ids=IMPLEMENTATIONS.keys())
@pytest.mark.parametrize("n", [2, 7, 37, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_refactorization_of_the_reduced_matrix(delete, n, dtype):
    hessian = hessians((5,), n, seed=n)
    upper = torch.linalg.cholesky(torch.linalg.inv(hessian), upper=True).to(dtype)
    index = torch.tensor([0, n - 1, n // 2, 1, (3 * n) // 4])  # the ends and the middle, per batch entry
    got, dropped = delete(upper, index)
    assert got.shape == (5, n - 1, n - 1) and dropped.shape == (5, n) and got.dtype == dtype
    check_against_refactorization(got, dropped, hessian, index, dtype)


@pytest.mark.parametrize("delete", IMPLEMENTATIONS.values(), ids=IMPLEMENTATIONS.keys())
def test_every_index_and_unbatched_inputs(delete):
    hessian = hessians((), 6, seed=1)
    upper = torch.linalg.cholesky(torch.linalg.inv(hessian), upper=True)
    for q in range(6):
        got, dropped = delete(upper, torch.tensor(q))
        assert got.shape == (5, 5) and dropped.shape == (6,)
        check_against_refactorization(got[None], dropped[None], hessian[None], [q], torch.float64)


@pytest.mark.parametrize("delete", IMPLEMENTATIONS.values(), ids=IMPLEMENTATIONS.keys())
def test_repeated_deletion_down_to_one_variable(delete):
    """OBC's loop: delete until one input is left; each step equals refactorizing what remains."""
    hessian = hessians((2,), 9, seed=2)
    upper = torch.linalg.cholesky(torch.linalg.inv(hessian), upper=True)
    remaining = [list(range(9)), list(range(9))]
    for step, choice in enumerate([3, 0, 6, 5, 1, 2, 0, 1]):
        index = torch.tensor([choice % len(remaining[0]), (choice + step) % len(remaining[1])])
        upper, _ = delete(upper, index)
        for b in range(2):
            del remaining[b][int(index[b])]
            sub = hessian[b][remaining[b]][:, remaining[b]]
            torch.testing.assert_close(upper[b], torch.linalg.cholesky(torch.linalg.inv(sub), upper=True))
    assert upper.shape == (2, 1, 1)


@pytest.mark.parametrize("delete", IMPLEMENTATIONS.values(), ids=IMPLEMENTATIONS.keys())
def test_reads_only_the_upper_triangle(delete):
    upper = torch.linalg.cholesky(torch.linalg.inv(hessians((3,), 11, seed=4)), upper=True).float()
    junk = upper + torch.randn(3, 11, 11).tril(-1)
    index = torch.tensor([4, 0, 10])
    for got, expected in zip(delete(junk, index), delete(upper, index)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_native_equals_reference():
    if not ops.NATIVE:
        pytest.skip("_C not built")
    upper = torch.linalg.cholesky(torch.linalg.inv(hessians((4,), 50, seed=5)), upper=True)
    index = torch.tensor([49, 0, 17, 33])
    for got, expected in zip(ops.cholesky_delete(upper, index), reference.cholesky_delete(upper, index)):
        torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("delete", IMPLEMENTATIONS.values(), ids=IMPLEMENTATIONS.keys())
def test_bad_indices_are_refused(delete):
    upper = torch.eye(4).expand(2, 4, 4)
    for index, message in [(torch.tensor([0, 4]), r"\[0, 4\)"), (torch.tensor([-1, 0]), r"\[0, 4\)"),
                           (torch.tensor([0, 1, 2]), "one column per batch entry")]:
        with pytest.raises(ValueError, match=message):
            delete(upper, index)


def test_opcheck():
    upper = torch.linalg.cholesky(torch.linalg.inv(hessians((3,), 10)), upper=True).float()
    torch.library.opcheck(torch.ops.sparsekern.cholesky_delete.default, (upper, torch.tensor([0, 9, 4])))


@pytest.mark.gpu
def test_cuda_kernel_matches_cpu():
    upper = torch.linalg.cholesky(torch.linalg.inv(hessians((7,), 600, seed=6)), upper=True).float()
    index = torch.tensor([0, 599, 300, 1, 598, 257, 256])
    for got, expected in zip(ops.cholesky_delete(upper.cuda(), index.cuda()), ops.cholesky_delete(upper, index)):
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-6)
