"""sparsekern::hinv_cholesky / hinv_cholesky_ (native, csrc/hinv_cholesky) against torch.linalg in float64 and the
three-call reference: random SPD Hessians of odd sizes (several of the native op's 256-column blocks on CPU),
ill-conditioned ones, dead inputs, damping escalation, and the in-place variant."""

import pytest
import torch

from sparsekern import ops, reference
from sparsekern.reference import NotPositiveDefiniteError

native = pytest.mark.skipif(not ops.NATIVE, reason="sparsekern._C is not built (tests/test_native.py says why)")


def random_hessian(n, seed=0, rows=None):
    x = torch.randn(rows or 3 * n + 2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return 2 * x.T @ x / x.shape[0]


def conditioned_hessian(n, condition, seed=0):
    """Q diag(1 .. 1/condition) Q^T, eigenvalues spaced geometrically."""
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    eigenvalues = torch.logspace(0, -torch.log10(torch.tensor(float(condition))).item(), n, dtype=torch.float64)
    return (q * eigenvalues) @ q.T


def inverse_error(upper, hessian64, damp):
    """||U^T U - (H + damp I)^-1|| / ||(H + damp I)^-1||, in float64."""
    exact = torch.linalg.inv(hessian64 + float(damp) * torch.eye(hessian64.shape[0], dtype=torch.float64))
    upper = upper.double()
    return float(torch.linalg.norm(upper.T @ upper - exact) / torch.linalg.norm(exact))


@native
@pytest.mark.parametrize("n", [1, 5, 37, 255, 257, 577])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_linalg_and_the_three_call_reference(n, dtype):
    hessian = random_hessian(n, seed=n)
    upper, damp = ops.hinv_cholesky(hessian.to(dtype), 0.01, 1)
    expected, expected_damp = reference.hinv_cholesky(hessian.to(dtype), 0.01, 1)
    assert upper.dtype == dtype and upper.shape == (n, n) and upper.is_contiguous()
    assert torch.equal(upper, upper.triu()), "U must be exactly upper triangular"
    assert (torch.diagonal(upper) > 0).all()
    torch.testing.assert_close(damp, expected_damp)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    assert inverse_error(upper, hessian, damp) < tolerance
    relative = float(torch.linalg.norm((upper - expected).double()) / torch.linalg.norm(expected.double()))
    assert relative < tolerance, f"differs from the three-call reference by {relative:.2e} (relative)"


@native
@pytest.mark.parametrize("condition", [1e4, 1e6, 1e8])
@pytest.mark.parametrize("percdamp", [1e-2, 1e-6])
def test_no_less_accurate_than_the_reference_when_ill_conditioned(condition, percdamp):
    n = 300  # two blocks on CPU
    hessian = conditioned_hessian(n, condition, seed=int(condition) % 97)
    upper, damp = ops.hinv_cholesky(hessian.float(), percdamp, 8)
    expected, expected_damp = reference.hinv_cholesky(hessian.float(), percdamp, 8)
    ours, theirs = inverse_error(upper, hessian, damp), inverse_error(expected, hessian, expected_damp)
    assert float(damp) == pytest.approx(float(expected_damp))
    # Measured: ours is 2.2x to 2.5x more accurate on these (fp64 diagonal blocks and panel solves).
    assert ours <= theirs, f"native error {ours:.2e} > reference {theirs:.2e}"


@native
def test_dead_inputs_get_a_unit_diagonal():
    hessian = random_hessian(300, seed=1)
    hessian[:, [0, 7, 299]] = 0
    hessian[[0, 7, 299], :] = 0
    upper, damp = ops.hinv_cholesky(hessian.float(), 0.01, 1)
    fixed = hessian.clone()
    fixed[[0, 7, 299], [0, 7, 299]] = 1
    assert inverse_error(upper, fixed, damp) < 1e-5
    assert hessian[0, 0] == 0, "the functional op must leave its input alone"


@native
def test_damping_escalates_until_the_factorization_succeeds():
    hessian = torch.eye(600, dtype=torch.float64)
    hessian[550, 550] = -0.03  # needs damp > 0.03: the first try (0.01 * mean diag ~ 0.01) fails, the second works
    upper, damp = ops.hinv_cholesky(hessian, 0.01, 4)
    first = 0.01 * torch.diagonal(hessian).mean()
    torch.testing.assert_close(damp, first * 10)
    assert inverse_error(upper, hessian, damp) < 1e-12


@native
def test_gives_up_with_an_error_that_says_what_to_change():
    with pytest.raises(NotPositiveDefiniteError, match=r"after 3 tries .*raise percdamp or max_tries"):
        ops.hinv_cholesky(-torch.eye(300), 0.01, 3)


@native
def test_in_place_variant_overwrites_the_hessian_with_the_same_factor():
    hessian = random_hessian(577, seed=3).float()
    upper, damp = ops.hinv_cholesky(hessian, 0.01, 2)
    storage = hessian.clone()
    damp_in_place = ops.hinv_cholesky_(storage, 0.01, 2)
    assert torch.equal(storage, upper) and torch.equal(damp_in_place, damp)


@native
def test_in_place_variant_restores_the_hessian_when_it_gives_up():
    hessian = random_hessian(300, seed=4)
    hessian[250, 250] = -1e3
    storage = hessian.clone()
    with pytest.raises(NotPositiveDefiniteError, match="after 2 tries"):
        ops.hinv_cholesky_(storage, 0.01, 2)
    assert torch.equal(storage, hessian)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="square"):
        ops.hinv_cholesky(torch.randn(4, 5), 0.01, 1)
    with pytest.raises(ValueError, match="float32 or float64"):
        ops.hinv_cholesky(torch.eye(4, dtype=torch.float16), 0.01, 1)
    with pytest.raises(ValueError, match="contiguous"):
        ops.hinv_cholesky_(torch.eye(6)[::2, ::2], 0.01, 1)


def test_opcheck():
    for name, args in [("hinv_cholesky", (random_hessian(40).float(), 0.01, 2)),
                       ("hinv_cholesky_", (random_hessian(40).float(), 0.01, 2))]:
        torch.library.opcheck(getattr(torch.ops.sparsekern, name).default, args)


@pytest.mark.gpu
@native
@pytest.mark.parametrize("n", [37, 1100])
def test_cuda_matches_cpu(n):
    hessian = random_hessian(n, seed=n).float()
    upper, damp = ops.hinv_cholesky(hessian.cuda(), 0.01, 2)
    expected, expected_damp = ops.hinv_cholesky(hessian, 0.01, 2)
    torch.testing.assert_close(upper.cpu(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(damp.cpu(), expected_damp)


@pytest.mark.gpu
@native
def test_cuda_stays_fp32_accurate_when_the_process_allows_tf32():
    hessian = random_hessian(2000, seed=7)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        upper, damp = ops.hinv_cholesky(hessian.float().cuda(), 0.01, 1)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert inverse_error(upper.cpu(), hessian, damp.cpu()) < 1e-5
