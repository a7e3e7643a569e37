"""``--method admm``: ADMM on the layer's sparse regression, then the exact refit on its mask, against an oracle
written from the iteration (fp64, a direct solve per step instead of the eigendecomposition)."""

import pytest
import torch

import sparsekern
from sparsekern.patterns import SparsityPattern
from sparsekern.prune import make_method
from sparsekern.prune.admm import RHO_GROWTH, AdmmOptions
from sparsekern.reference.masks import nm_mask, prune_count, tensor_mask

from checks import assert_close
from test_lsq_refit import correlated_inputs, gen, oracle as least_squares


def damped_hessian(x, percdamp=0.01):
    h = 2 * x.double().T @ x.double() / x.shape[0]
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0
    return h + percdamp * diag.mean() * torch.eye(h.shape[0], dtype=h.dtype), dead


def admm_oracle(weight, x, pattern, iters=AdmmOptions().admm_iters, rho=AdmmOptions().admm_rho):
    """The iteration of the method's docstring, literally: scale to a unit diagonal, D = (Wn Hn + rho (Z - U))
    (Hn + rho I)^-1 by a solve, Z = the projection of D + U, U += D - Z, rho *= growth; then each row's kept
    weights by its normal equations."""
    p = SparsityPattern.parse(pattern)
    h, dead = damped_hessian(x)
    s = torch.diagonal(h).sqrt()
    hn = h / s[:, None] / s[None, :]
    wn = weight.double().clone()
    wn[:, dead] = 0
    wn = wn * s

    def select(values):
        scores = values.abs().masked_fill(dead, 0)
        return nm_mask(scores, p.n, p.m) if p.n else tensor_mask(scores, prune_count(scores.numel(), p.sparsity))

    mask = select(wn)
    z, u = wn.masked_fill(mask, 0), torch.zeros_like(wn)
    growth = RHO_GROWTH ** (1 / max(iters - 1, 1))
    eye = torch.eye(hn.shape[0], dtype=hn.dtype)
    for _ in range(iters):
        d = torch.linalg.solve(hn + rho * eye, (wn @ hn + rho * (z - u)).T).T
        mask = select(d + u)
        z = (d + u).masked_fill(mask, 0)
        u = u + d - z
        rho *= growth
    return least_squares(wn, hn, mask) / s, mask


def prune_linear(method, weight, x, pattern, **options):
    recipe = make_method(method, **options)
    stats = recipe.new_stats(weight.shape[1], torch.device("cpu"), "layer")
    stats.add(x)
    return recipe.prune_linear(weight.clone(), recipe.prepare(stats, "layer"), SparsityPattern.parse(pattern),
                               "layer")


def output_error(weight, pruned, x):
    return ((weight.double() - pruned.double()) @ x.double().T).square().sum()


@pytest.mark.parametrize("shape", [(7, 24), (13, 40), (5, 64)])
@pytest.mark.parametrize("pattern", ["0.5", "0.7", "2:4", "4:8"])
def test_admm_matches_its_iteration(shape, pattern):
    rows, cols = shape
    weight = torch.randn(shape, generator=gen(rows * cols))
    x = correlated_inputs(8 * cols, cols, rows)
    got = prune_linear("admm", weight, x, pattern, lsq_iters=cols)  # CG exact within cols steps
    expected, expected_mask = admm_oracle(weight, x, pattern)
    assert torch.equal(got.mask, expected_mask), f"{int((got.mask != expected_mask).sum())} mask entries differ"
    assert_close(output_error(weight, got.weight, x), output_error(weight, expected, x), "output error",
                 rtol=1e-4, atol=1e-8)
    assert_close(got.weight, expected, "weights", rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("shape", [(24, 96), (13, 123), (32, 64)])
@pytest.mark.parametrize("pattern", ["0.5", "0.7", "2:4"])
def test_admm_keeps_the_exact_pattern_and_beats_sparsegpt(shape, pattern):
    rows, cols = shape
    p = SparsityPattern.parse(pattern)
    if p.is_nm and cols % p.m:
        pytest.skip("N:M needs the columns to be a multiple of M")
    weight = torch.randn(shape, generator=gen(cols))
    x = correlated_inputs(512, cols, rows)
    admm = prune_linear("admm", weight, x, pattern)
    zeros = admm.weight == 0
    assert torch.equal(zeros, admm.mask)
    if p.is_nm:
        assert (zeros.reshape(rows, -1, p.m).sum(-1) == p.n).all()
    else:
        assert int(zeros.sum()) == prune_count(rows * cols, p.sparsity)
    sparsegpt = prune_linear("sparsegpt", weight, x, pattern)
    assert output_error(weight, admm.weight, x) < output_error(weight, sparsegpt.weight, x)


def test_inputs_never_seen_are_pruned_first():
    rows, cols = 8, 32
    weight = torch.randn(rows, cols, generator=gen(1))
    x = correlated_inputs(256, cols, 2)
    x[:, [3, 17]] = 0  # never active
    result = prune_linear("admm", weight, x, "0.5")
    assert result.mask[:, [3, 17]].all()
    assert torch.isfinite(result.weight).all()


def test_admm_options_and_its_steps():
    with pytest.raises(ValueError, match="--admm-iters 0: must be 1 or more"):
        make_method("admm", admm_iters=0)
    with pytest.raises(ValueError, match="--admm-rho -1.0: must be positive"):
        make_method("admm", admm_rho=-1.0)
    with pytest.raises(ValueError, match="already updates the kept weights"):
        make_method("admm", update="obs")
    make_method("admm", update="lsq")  # a refit after it is allowed (and near a no-op)


def test_admm_through_the_api(tiny_llama, char_tokenizer, text_file):
    report = sparsekern.prune(tiny_llama, char_tokenizer, method="admm", sparsity="0.6", admm_iters=5,
                              calib=text_file, nsamples=4, seqlen=16, progress=False)
    assert report.method == "admm" and report.options["admm_iters"] == 5 and abs(report.sparsity - 0.6) < 1e-3
