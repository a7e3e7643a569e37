"""``sparsekern::lsq_refit`` and ``--update lsq``: the least-squares refit of the kept weights on a fixed mask,
against an oracle that solves each row's normal equations directly (fp64)."""

import json

import pytest
import torch

import sparsekern
from sparsekern import cli
from sparsekern import ops
from sparsekern.patterns import SparsityPattern
from sparsekern.prune import make_method
from sparsekern.prune.lsq import damped_hessian

from checks import assert_close


def gen(seed):
    return torch.Generator().manual_seed(seed)


def correlated_inputs(tokens, cols, seed):
    """LLM-like inputs: a low-rank part shared by the channels, per-channel scales that vary 30x, some noise."""
    x = torch.randn(tokens, max(cols // 4, 2), generator=gen(seed)) @ torch.randn(max(cols // 4, 2), cols,
                                                                                   generator=gen(seed + 1))
    x = x + 0.3 * torch.randn(tokens, cols, generator=gen(seed + 2))
    return x * torch.logspace(-0.75, 0.75, cols)[torch.randperm(cols, generator=gen(seed + 3))]


def damped(x, percdamp=0.01):
    h = 2 * x.double().T @ x.double() / x.shape[0]
    return h + percdamp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)


def oracle(dense, hessian, mask):
    """Per row: v_K = H_KK^-1 (w H)_K, v = 0 elsewhere (fp64)."""
    w, h = dense.double(), hessian.double()
    out = torch.zeros_like(w)
    for i in range(w.shape[0]):
        keep = ~mask[i]
        if keep.any():
            out[i, keep] = torch.linalg.solve(h[keep][:, keep], (w[i] @ h)[keep])
    return out


def error(dense, refit, hessian):
    delta = dense.double() - refit.double()
    return ((delta @ hessian.double()) * delta).sum(1)


@pytest.mark.parametrize("shape", [(5, 24), (13, 123), (7, 127), (32, 64)])
@pytest.mark.parametrize("pattern", ["0.5", "0.7", "2:4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_refit_reaches_the_least_squares_optimum(shape, pattern, dtype):
    rows, cols = shape
    parsed = SparsityPattern.parse(pattern)
    if parsed.is_nm and cols % parsed.m:
        pytest.skip("N:M needs the columns to be a multiple of M")
    dense = torch.randn(shape, generator=gen(cols)).to(dtype)
    h = damped(correlated_inputs(4 * cols, cols, rows))
    mask = ops.topk_mask(torch.rand(shape, generator=gen(rows)), parsed.sparsity, parsed.n, parsed.m, True)
    start = dense.masked_fill(mask, 0)
    refit, loss = ops.lsq_refit(dense, start, h.float(), mask, cols)  # CG converges in at most cols steps
    assert refit.dtype == torch.float32 and loss.shape == (rows,)
    assert torch.equal(refit[mask], torch.zeros(int(mask.sum()))), "a pruned weight is not exactly zero"
    expected = oracle(dense, h, mask)
    # The solution itself is ill-conditioned along H's weak directions; the error it leaves is what is minimized.
    assert_close(error(dense, refit, h), error(dense, expected, h), "error", rtol=1e-3, atol=1e-6)
    assert_close(loss, error(dense, expected, h) / 2, "loss", rtol=1e-3, atol=1e-6)
    assert_close(refit, expected, "weights", rtol=5e-2, atol=5e-2)


def test_every_iteration_lowers_each_rows_error_from_any_start():
    rows, cols = 9, 77
    dense = torch.randn(rows, cols, generator=gen(1))
    h = damped(correlated_inputs(300, cols, 2)).float()
    mask = torch.rand(rows, cols, generator=gen(3)) < 0.6
    start = torch.randn(rows, cols, generator=gen(4))  # a bad start, with values where the mask prunes too
    previous = error(dense, start.masked_fill(mask, 0), h)
    for iters in range(1, 12):
        refit, _ = ops.lsq_refit(dense, start, h, mask, iters)
        current = error(dense, refit, h)
        assert (current <= previous * (1 + 1e-5) + 1e-6).all(), (iters, current - previous)
        previous = current
    assert torch.equal(ops.lsq_refit(dense, start, h, mask, 0)[0], start.masked_fill(mask, 0))


def test_rows_that_are_all_pruned_or_already_optimal_stay_finite():
    cols = 16
    dense = torch.randn(3, cols, generator=gen(5))
    h = damped(torch.randn(64, cols, generator=gen(6))).float()
    mask = torch.zeros(3, cols, dtype=torch.bool)
    mask[0] = True  # everything pruned
    mask[1, ::2] = True
    start = dense.masked_fill(mask, 0)
    start[2] = dense[2]  # nothing pruned and already the optimum: the residual is zero from the start
    refit, loss = ops.lsq_refit(dense, start, h, mask, 10)
    assert torch.isfinite(refit).all() and torch.isfinite(loss).all()
    assert torch.equal(refit[0], torch.zeros(cols)) and torch.equal(refit[2], dense[2])


def test_refit_op_checks_its_arguments():
    w = torch.randn(4, 8)
    h = torch.eye(8)
    mask = torch.zeros(4, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="start has shape"):
        ops.lsq_refit(w, w[:, :4], h, mask, 1)
    with pytest.raises(ValueError, match="mask must be bool"):
        ops.lsq_refit(w, w, h, mask.float(), 1)
    with pytest.raises(ValueError, match="hessian has shape"):
        ops.lsq_refit(w, w, torch.eye(4), mask, 1)
    with pytest.raises(ValueError, match="iters must be 0 or positive"):
        ops.lsq_refit(w, w, h, mask, -1)


def test_refit_op_passes_opcheck():
    w = torch.randn(6, 16, generator=gen(7))
    h = damped(torch.randn(64, 16, generator=gen(8))).float()
    mask = torch.rand(6, 16, generator=gen(9)) < 0.5
    torch.library.opcheck(torch.ops.sparsekern.lsq_refit.default, (w, w.masked_fill(mask, 0), h, mask, 5))


# -- the step ---------------------------------------------------------------------------------------------------


def prune_with(method, update, weight, x, pattern, **options):
    recipe = make_method(method, update=update, **options)
    stats = recipe.new_stats(weight.shape[1], torch.device("cpu"), "layer")
    stats.add(x)
    return recipe.prune_linear(weight.clone(), recipe.prepare(stats, "layer"), SparsityPattern.parse(pattern),
                               "layer")


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "ria", "magnitude"])
@pytest.mark.parametrize("pattern", ["0.5", "0.7", "2:4", "4:8"])
def test_update_lsq_keeps_the_mask_and_lowers_the_error_of_every_method(method, pattern):
    rows, cols = 24, 96
    weight = torch.randn(rows, cols, generator=gen(11))
    x = correlated_inputs(512, cols, 12)
    before = prune_with(method, "none", weight, x, pattern)
    after = prune_with(method, "lsq", weight, x, pattern, lsq_iters=50)
    assert torch.equal(before.weight == 0, after.weight == 0), "the refit changed the mask"
    output_error = {name: ((weight - r.weight) @ x.T).square().sum().item()
                    for name, r in (("before", before), ("after", after))}
    # SparseGPT compensates within its sweep already, the mask-only methods not at all.
    assert output_error["after"] < (0.97 if method == "sparsegpt" else 0.8) * output_error["before"], output_error
    h = damped_hessian(_stats(x), 0.01, "layer").hessian
    expected = oracle(weight, h, before.weight == 0)
    assert_close(error(weight, after.weight, h), error(weight, expected, h), "error", rtol=1e-3, atol=1e-5)


def _stats(x, recipe=None):
    recipe = recipe or make_method("wanda", update="lsq")
    stats = recipe.new_stats(x.shape[1], torch.device("cpu"), "layer")
    stats.add(x)
    return stats


def test_lsq_after_sparsegpt_reads_the_hessian_before_sparsegpt_factors_it():
    cols = 40
    x = correlated_inputs(200, cols, 13)
    recipe = make_method("sparsegpt", update="lsq")
    stats = _stats(x, recipe)
    hessian = next(iter(stats.parts.values())).hessian.clone()
    sparsegpt_factor, lsq_hessian = recipe.prepare(stats, "layer")
    expected = hessian + 0.01 * torch.diagonal(hessian).mean() * torch.eye(cols)
    assert_close(lsq_hessian.hessian, expected, "the refit's damped Hessian")
    # SparseGPT's factor is the inverse's: U^T U (H + damp I) = I
    u = sparsegpt_factor.hinv_upper.double()
    assert_close(u.T @ u @ expected.double(), torch.eye(cols, dtype=torch.float64), "U^T U H", atol=1e-3, rtol=0)


def test_lsq_is_refused_with_quantization_and_obs_still_refused_after_sparsegpt():
    with pytest.raises(ValueError, match="would undo sparsegpt's --wbits quantization"):
        make_method("sparsegpt", update="lsq", wbits=4)
    with pytest.raises(ValueError, match="already updates the kept weights"):
        make_method("sparsegpt", update="obs")
    with pytest.raises(ValueError, match="--lsq-iters 0: must be 1 or more"):
        make_method("wanda", update="lsq", lsq_iters=0)


def test_update_lsq_through_the_api_and_the_cli(tiny_llama, char_tokenizer, tiny_folder, text_file, tmp_path):
    report = sparsekern.prune(tiny_llama, char_tokenizer, method="sparsegpt", sparsity="0.5", update="lsq",
                              lsq_iters=5, calib=text_file, nsamples=4, seqlen=16, progress=False)
    assert report.options["update"] == "lsq" and report.options["lsq_iters"] == 5
    assert abs(report.sparsity - 0.5) < 1e-6
    out = tmp_path / "out"
    code = cli.main(["prune", str(tiny_folder), "--method", "wanda", "--update", "lsq", "--sparsity",
                     "2:4", "--calib", str(text_file), "--nsamples", "4", "--seqlen", "16", "--out",
                     str(out), "--quiet", "--device", "cpu"])
    assert code == 0
    record = json.loads((out / "sparsity.json").read_text())
    assert record["options"]["update"] == "lsq" and record["options"]["lsq_iters"] == 20
