"""``sparsekern::topk_mask``: the selection op every score-based method uses, through the Triton kernels under the
interpreter against the reference, and the reference against a sort-based oracle written from the definition."""

import pytest
import torch

from sparsekern import ops, reference
from checks import assert_mask

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PATTERNS = [(0.5, 0, 0, True), (0.7, 0, 0, True), (0.3, 0, 0, False), (0.6, 0, 0, False), (0.0, 2, 4, True),
            (0.0, 4, 8, True), (0.0, 1, 4, True)]

pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def oracle(scores, sparsity, n, m, per_row):
    """The lowest entries by a stable sort of each population (row, N:M group or whole tensor)."""
    s = scores.float()
    if n:
        groups = s.reshape(-1, m)
        order = torch.sort(groups, dim=1, stable=True).indices[:, :n]
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order, True).reshape(s.shape)
    population = s if per_row else s.reshape(1, -1)
    k = round(population.shape[1] * sparsity)
    order = torch.sort(population, dim=1, stable=True).indices[:, :k]
    return torch.zeros_like(population, dtype=torch.bool).scatter_(1, order, True).reshape(s.shape)


@pytest.mark.parametrize("shape", [(5, 24), (13, 40), (1, 8), (7, 1000)])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_reference_matches_the_sort_oracle(shape, pattern):
    scores = torch.rand(shape, generator=gen(shape[1]))
    assert torch.equal(reference.topk_mask(scores, *pattern), oracle(scores, *pattern))


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 24), (3, 136), (9, 1000)])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_kernels_match_the_reference(shape, dtype, pattern):
    scores = torch.rand(shape, generator=gen(shape[0])).to(dtype)
    before = scores.clone()
    mask = ops.topk_mask(scores, *pattern)
    assert_mask(mask, "topk mask")
    assert torch.equal(scores, before), "the scores must not be modified"
    expected = reference.topk_mask(scores, *pattern)
    if pattern[1] and dtype != torch.float32:  # N:M ties in half precision: any valid selection of the group
        assert torch.equal(mask.reshape(-1, pattern[2]).sum(1), expected.reshape(-1, pattern[2]).sum(1))
        kept_min = torch.where(mask, float("inf"), scores.float()).reshape(-1, pattern[2]).amin(1)
        pruned_max = torch.where(mask, scores.float(), -1.0).reshape(-1, pattern[2]).amax(1)
        assert (pruned_max <= kept_min).all()
    else:
        assert torch.equal(mask, expected)


@pytest.mark.usefixtures("interpret")
def test_ties_are_broken_by_position_like_the_reference():
    scores = torch.randint(0, 3, (6, 40), generator=gen(3)).float()
    for pattern in [(0.5, 0, 0, True), (0.45, 0, 0, False)]:
        assert torch.equal(ops.topk_mask(scores, *pattern), reference.topk_mask(scores, *pattern))


def test_refuses_negative_or_nan_scores_and_bad_patterns():
    with pytest.raises(ValueError, match="non-negative and not NaN"):
        ops.topk_mask(torch.tensor([[1.0, -0.5]]), 0.5, 0, 0, True)
    with pytest.raises(ValueError, match="non-negative and not NaN"):
        ops.topk_mask(torch.tensor([[1.0, float("nan")]]), 0.5, 0, 0, True)
    with pytest.raises(ValueError, match="scores has 6 columns, not divisible by M=4"):
        ops.topk_mask(torch.rand(2, 6), 0.0, 2, 4, True)
    with pytest.raises(ValueError, match="outside"):
        ops.topk_mask(torch.rand(2, 6), 1.0, 0, 0, True)


def test_opcheck():
    for args in [(0.5, 0, 0, True), (0.5, 0, 0, False), (0.0, 2, 4, True)]:
        torch.library.opcheck(ops.topk_mask, (torch.rand(3, 16, generator=gen(1)), *args))
