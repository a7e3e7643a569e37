"""SparseGPT's reference against a straightforward, unblocked OBS oracle written from the paper's formulas."""

import pytest
import torch

from sparsekern import reference
from sparsekern.reference.quant import minmax_params, quantize


def correlated_hessian(cols, tokens=None, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    tokens = tokens or 4 * cols
    mix = torch.randn(cols, cols, generator=gen, dtype=dtype) / cols**0.5 + torch.eye(cols, dtype=dtype)
    scales = torch.exp(torch.randn(cols, generator=gen, dtype=dtype))
    x = (torch.randn(tokens, cols, generator=gen, dtype=dtype) @ mix) * scales
    return 2 * x.T @ x / tokens


def obs_oracle(weight, hessian, sparsity, n, m, blocksize, bits=0, percdamp=0.01):
    """Column by column: the OBS update with the inverse Hessian of the not-yet-visited columns, computed
    directly as inv(H[i:, i:]) in fp64 (no Cholesky trick, no lazy batching)."""
    w = weight.double().clone()
    h = hessian.double().clone()
    h += percdamp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    rows, cols = w.shape
    inv_tail = [torch.linalg.inv(h[i:, i:]) for i in range(cols)]
    d2 = torch.tensor([inv[0, 0] for inv in inv_tail], dtype=h.dtype)  # [inv(H[i:, i:])]_00 = U_ii^2
    mask = torch.zeros_like(w, dtype=torch.bool)
    scale, zero = minmax_params(w, bits) if bits else (None, None)
    loss = torch.zeros(rows, dtype=h.dtype)
    for i in range(cols):
        if not n and i % blocksize == 0:
            j = min(i + blocksize, cols)
            scores = (w[:, i:j] ** 2 / d2[i:j]).flatten()
            k = int(round(scores.numel() * sparsity))
            block = torch.zeros_like(scores, dtype=torch.bool)
            block[torch.argsort(scores)[:k]] = True
            mask[:, i:j] = block.reshape(rows, j - i)
        if n and i % m == 0:
            scores = w[:, i : i + m] ** 2 / d2[i : i + m]
            lowest = torch.argsort(scores, dim=1)[:, :n]
            mask[:, i : i + m].scatter_(1, lowest, True)
        q = torch.where(mask[:, i], 0.0, w[:, i])
        if bits:
            q = torch.where(mask[:, i], q, quantize(q, scale, zero, bits))
        delta = w[:, i] - q
        loss += delta**2 / d2[i] / 2
        w[:, i:] -= torch.outer(delta / inv_tail[i][0, 0], inv_tail[i][0, :])
    return w, loss, mask


def run_reference(weight, hessian, sparsity, n, m, blocksize, bits=0, groupsize=0):
    upper, _ = reference.hinv_cholesky(hessian, 0.01, 1)
    return reference.sparsegpt_prune(weight, upper, sparsity, n, m, blocksize, bits, groupsize)


CASES = [
    # rows, cols, sparsity, n, m, blocksize, bits
    (5, 24, 0.5, 0, 0, 8, 0),
    (7, 36, 0.6, 0, 0, 16, 0),  # last block shorter
    (6, 32, 0.5, 2, 4, 8, 0),
    (5, 40, 0.5, 4, 8, 16, 0),
    (6, 24, 0.5, 0, 0, 8, 4),
    (5, 32, 0.5, 2, 4, 16, 3),
]


@pytest.mark.parametrize("rows, cols, sparsity, n, m, blocksize, bits", CASES)
def test_blocked_equals_unblocked_obs(rows, cols, sparsity, n, m, blocksize, bits):
    torch.manual_seed(rows * cols)
    weight = torch.randn(rows, cols, dtype=torch.float64)
    hessian = correlated_hessian(cols, seed=cols)
    pruned, loss, _, _ = run_reference(weight, hessian, sparsity, n, m, blocksize, bits)
    expected, expected_loss, expected_mask = obs_oracle(weight, hessian, sparsity, n, m, blocksize, bits)
    assert (pruned[expected_mask] == 0).all()
    if not bits:  # (a kept weight may also round to 0 on a coarse grid)
        assert torch.equal(pruned == 0, expected_mask)
    torch.testing.assert_close(pruned, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-9, atol=1e-9)


def test_fp32_tracks_fp64():
    torch.manual_seed(1)
    weight = torch.randn(16, 64)
    hessian = correlated_hessian(64, seed=3)
    pruned32, _, _, _ = run_reference(weight, hessian.float(), 0.5, 0, 0, 32)
    pruned64, _, _, _ = run_reference(weight.double(), hessian, 0.5, 0, 0, 32)
    assert (pruned32 == 0).ne(pruned64 == 0).float().mean() < 0.02  # near-ties may flip in fp32
    same = (pruned32 != 0) & (pruned64 != 0)
    assert (pruned32.double() - pruned64)[same].abs().max() < 1e-3 * pruned64.abs().max()


def test_sparsity_zero_leaves_weight_unchanged():
    weight = torch.randn(8, 48)
    pruned, loss, _, _ = run_reference(weight, correlated_hessian(48).float(), 0.0, 0, 0, 16)
    assert torch.equal(pruned, weight)
    assert loss.abs().max() == 0


@pytest.mark.parametrize("sparsity, n, m", [(0.5, 0, 0), (0.7, 0, 0), (0.3, 0, 0), (0.5, 2, 4), (0.5, 4, 8), (0.25, 1, 4)])
def test_exact_sparsity(sparsity, n, m):
    rows, cols, blocksize = 9, 64, 16
    weight = torch.randn(rows, cols)
    pruned, _, _, _ = run_reference(weight, correlated_hessian(cols).float(), sparsity, n, m, blocksize)
    zeros = pruned == 0
    if n:
        assert (zeros.reshape(rows, cols // m, m).sum(-1) >= n).all()
        assert zeros.sum() == rows * cols * n // m
    else:
        for i in range(0, cols, blocksize):
            assert zeros[:, i : i + blocksize].sum() == round(rows * blocksize * sparsity)


@pytest.mark.parametrize("bits, groupsize, blocksize", [(4, 0, 16), (3, 8, 16), (3, 16, 16), (4, 32, 16)])
def test_quantized_weights_lie_on_their_grid(bits, groupsize, blocksize):
    rows, cols = 6, 64
    weight = torch.randn(rows, cols, dtype=torch.float64)
    pruned, _, scale, zero = run_reference(weight, correlated_hessian(cols), 0.5, 2, 4, blocksize, bits, groupsize)
    assert ((pruned == 0).reshape(rows, -1, 4).sum(-1) >= 2).all()
    group_of_column = torch.arange(cols) // groupsize if groupsize else torch.zeros(cols, dtype=torch.long)
    s, z = scale[:, group_of_column], zero[:, group_of_column]
    level = pruned / s + z
    assert torch.allclose(level, level.round(), atol=1e-6), "a kept weight is off its grid"
    assert level.round().min() >= 0 and level.round().max() <= 2**bits - 1
    assert torch.equal(z, z.round())


def test_groupsize_must_align_with_blocksize():
    with pytest.raises(ValueError, match="divide blocksize"):
        run_reference(torch.randn(4, 48), correlated_hessian(48).float(), 0.5, 0, 0, 16, 4, 12)
