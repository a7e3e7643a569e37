import pytest
import torch

from sparsekern import reference
from sparsekern.reference import NotPositiveDefiniteError


def test_streaming_hessian_equals_batch_formula():
    torch.manual_seed(0)
    chunks = [torch.randn(3, 17, 12, dtype=torch.float64), torch.randn(5, 12, dtype=torch.float64),
              torch.randn(1, 9, 12, dtype=torch.float64)]
    hessian, sumsq = torch.zeros(12, 12, dtype=torch.float64), torch.zeros(12, dtype=torch.float64)
    count = count_sq = 0
    for chunk in chunks:
        count = reference.hessian_update(hessian, chunk, count)
        count_sq = reference.sumsq_update(sumsq, chunk, count_sq)
    x = torch.cat([c.reshape(-1, 12) for c in chunks])
    assert count == count_sq == x.shape[0]
    torch.testing.assert_close(hessian, 2 * x.T @ x / x.shape[0])
    torch.testing.assert_close(sumsq, (x**2).mean(0))


def test_hessian_update_accepts_half_inputs():
    hessian = torch.zeros(8, 8)
    x = torch.randn(10, 8).to(torch.bfloat16)
    reference.hessian_update(hessian, x, 0)
    torch.testing.assert_close(hessian, 2 * x.float().T @ x.float() / 10)


@pytest.mark.parametrize("n", [5, 37, 123])
def test_hinv_cholesky_factor(n):
    torch.manual_seed(n)
    x = torch.randn(3 * n, n, dtype=torch.float64)
    hessian = 2 * x.T @ x / x.shape[0]
    upper, damp = reference.hinv_cholesky(hessian, 0.01, 1)
    assert torch.equal(upper, upper.triu())
    expected_damp = 0.01 * torch.diagonal(hessian).mean()
    torch.testing.assert_close(damp, expected_damp)
    damped = hessian + expected_damp * torch.eye(n, dtype=hessian.dtype)
    torch.testing.assert_close(upper.T @ upper, torch.linalg.inv(damped), rtol=1e-8, atol=1e-10)


def test_dead_inputs_get_unit_diagonal():
    x = torch.randn(40, 10, dtype=torch.float64)
    x[:, [2, 7]] = 0
    hessian = 2 * x.T @ x / 40
    upper, damp = reference.hinv_cholesky(hessian, 0.01, 1)
    fixed = hessian.clone()
    fixed[[2, 7], [2, 7]] = 1
    damped = fixed + damp * torch.eye(10, dtype=fixed.dtype)
    torch.testing.assert_close(upper.T @ upper, torch.linalg.inv(damped))


def test_damping_escalates_on_indefinite_hessian():
    hessian = torch.eye(6, dtype=torch.float64)
    hessian[0, 0] = -0.03  # needs damp > 0.03; first try is 0.01 * mean(diag) ~ 0.008
    upper, damp = reference.hinv_cholesky(hessian, 0.01, 4)
    first = 0.01 * torch.diagonal(hessian).mean()
    assert torch.isclose(damp, first * 10)
    torch.testing.assert_close(upper.T @ upper, torch.linalg.inv(hessian + damp * torch.eye(6, dtype=hessian.dtype)))


def test_gives_up_with_a_clear_error():
    hessian = -torch.eye(4)
    with pytest.raises(NotPositiveDefiniteError, match="after 3 tries"):
        reference.hinv_cholesky(hessian, 0.01, 3)
