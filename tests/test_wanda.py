"""Triton kernels ``wanda_prune`` and ``nm_mask`` (triton_kernels/wanda.py) against the reference, through the
public ops under the interpreter. Unstructured masks must be identical to the reference, ties included; N:M masks
identical where scores are distinct, and a valid N:M selection where they tie (``topk`` orders ties freely)."""

import pytest
import torch

import sparsekern
from sparsekern import ops, reference
from checks import assert_mask, check_nm_selection, group_has_ties

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

pytestmark = pytest.mark.usefixtures("interpret", "poisoned_outputs")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def prune_both(weight, act_norm, sparsity, n=0, m=0):
    """Run the op on ``weight`` (in place) and the reference on a copy; check the op's own invariants."""
    before = weight.clone()
    expected_weight = weight.clone()
    mask = ops.wanda_prune(weight, act_norm, sparsity, n, m)
    expected = reference.wanda_prune(expected_weight, act_norm, sparsity, n, m)
    assert_mask(mask, "wanda mask")
    assert mask.shape == weight.shape
    # Zero exactly where pruned, every other element untouched (bit for bit).
    assert torch.equal(weight, before.masked_fill(mask, 0)), "weight not zeroed exactly where masked"
    return mask, expected


def test_ops_reach_the_kernels():
    from sparsekern.triton_kernels import wanda

    assert sparsekern.get_backend() == "interpret"
    w = torch.zeros(2, 4)
    assert ops._implementation("wanda_prune", w) is wanda.wanda_prune
    assert ops._implementation("nm_mask", w) is wanda.nm_mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 123), (37, 260), (1, 7), (2, 1500)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7])
def test_unstructured_matches_reference(shape, dtype, sparsity):
    weight = torch.randn(shape, generator=gen(shape[1])).to(dtype)
    act_norm = torch.rand(shape[1], generator=gen(1)).to(dtype) + 0.1
    mask, expected = prune_both(weight, act_norm, sparsity)
    assert torch.equal(mask, expected)
    assert (mask.sum(1) == reference.prune_count(shape[1], sparsity)).all()


def test_unstructured_prunes_whole_row_when_k_rounds_to_cols():
    weight = torch.randn(3, 7, generator=gen(0))
    mask, expected = prune_both(weight, torch.rand(7, generator=gen(1)), 0.95)  # round(6.65) = 7
    assert mask.all() and torch.equal(mask, expected) and not weight.any()


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_unstructured_ties_match_reference(sparsity):
    # Integer weights in [-3, 3] (a seventh are zero) and an act_norm with repeated values: scores tie heavily,
    # so the threshold value is shared by many entries and the first ones by position must be taken.
    weight = torch.randint(-3, 4, (9, 130), generator=gen(3)).float()
    act_norm = torch.randint(1, 3, (130,), generator=gen(4)).float()
    act_norm[:10] = 0  # dead inputs: every score there is 0
    mask, expected = prune_both(weight, act_norm, sparsity)
    assert torch.equal(mask, expected)
    assert (mask.sum(1) == reference.prune_count(130, sparsity)).all()


@pytest.mark.parametrize("layout", ["transposed", "column_slice"])
@pytest.mark.parametrize("pattern", [(0.5, 0, 0), (0.0, 2, 4)])
def test_non_contiguous_weight_pruned_in_place(layout, pattern):
    sparsity, n, m = pattern
    if layout == "transposed":
        base = torch.randn(36, 10, generator=gen(5))
        weight = base.T  # [10, 36], strides (1, 10)
        untouched = None
    else:
        base = torch.randn(6, 48, generator=gen(6))
        weight = base[:, 4:40]  # [6, 36], stride (48, 1), other columns must stay as they are
        untouched = torch.cat([base[:, :4], base[:, 40:]], 1).clone()
    assert not weight.is_contiguous()
    act_norm = torch.rand(36, generator=gen(7))
    mask, expected = prune_both(weight, act_norm, sparsity, n, m)
    assert torch.equal(mask, expected)  # with prune_both's check: the view holds the reference's pruned weight
    if untouched is not None:
        assert torch.equal(torch.cat([base[:, :4], base[:, 40:]], 1), untouched)


NM_PATTERNS = [(2, 4), (4, 8), (1, 4), (1, 3)]  # 1:3: M not a power of two (padded group members)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 24), (37, 264), (1, 8), (3, 1032)])
@pytest.mark.parametrize("nm", NM_PATTERNS)
def test_nm_wanda_matches_reference(shape, dtype, nm):
    n, m = nm
    cols = shape[1] - shape[1] % m
    act_norm = torch.rand(cols, generator=gen(2)) + 0.1
    weight = torch.randn(shape[0], cols, generator=gen(cols)).to(dtype)
    # Rounded to half precision, two weights of a group can tie in score; topk orders those freely.
    scores = weight.abs().float() * act_norm
    group_ties = group_has_ties(scores, m)
    mask, expected = prune_both(weight, act_norm, 0.0, n, m)
    same = (mask == expected).reshape(shape[0], cols // m, m).all(-1)
    assert (same | group_ties).all(), f"{int((~same & ~group_ties).sum())} tie-free groups differ"
    check_nm_selection(scores, mask, n, m)


@pytest.mark.parametrize("nm", NM_PATTERNS)
def test_nm_wanda_with_ties_is_a_valid_selection(nm):
    n, m = nm
    weight = torch.randint(-2, 3, (7, 48), generator=gen(8)).float()  # a fifth zero, many equal magnitudes
    scores = weight.abs()
    mask, _ = prune_both(weight, torch.ones(48), 0.0, n, m)
    check_nm_selection(scores, mask, n, m)
    # Ties go to the earlier position: in an all-equal group the first n are pruned.
    flat = torch.zeros(1, 2 * m)
    flat_mask, _ = prune_both(flat, torch.ones(2 * m), 0.0, n, m)
    assert flat_mask.reshape(2, m)[:, :n].all() and not flat_mask.reshape(2, m)[:, n:].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nm", NM_PATTERNS)
def test_nm_mask_matches_reference(dtype, nm):
    n, m = nm
    scores = torch.randn(11, 30 * m, generator=gen(9)).to(dtype)  # signed scores: plain float order
    got = ops.nm_mask(scores, n, m)
    assert_mask(got, "nm_mask")
    check_nm_selection(scores.float(), got, n, m)
    if dtype == torch.float32:
        assert torch.equal(got, reference.nm_mask(scores, n, m))
    else:
        ties = group_has_ties(scores.float(), m)
        same = (got == reference.nm_mask(scores, n, m)).reshape(11, 30, m).all(-1)
        assert (same | ties).all()


def test_nm_mask_non_contiguous_scores():
    scores = torch.rand(40, 9, generator=gen(10)).T  # [9, 40], strides (1, 9)
    got = ops.nm_mask(scores, 2, 4)
    assert_mask(got, "nm_mask")
    assert torch.equal(got, reference.nm_mask(scores, 2, 4))


def test_empty_weight():
    assert ops.wanda_prune(torch.zeros(0, 8), torch.ones(8), 0.5, 0, 0).shape == (0, 8)
    assert ops.nm_mask(torch.zeros(0, 8), 2, 4).shape == (0, 8)


@pytest.mark.parametrize("args", [(0.5, 0, 0), (0.0, 2, 4)])
def test_opcheck_through_the_kernels(args):
    # Schema (weight mutated in place, mask a fresh tensor), fake impl and dispatch, with the kernel as the impl.
    weight = torch.randn(3, 16, generator=gen(11)).to(torch.float16)
    torch.library.opcheck(ops.wanda_prune, (weight, torch.rand(16, generator=gen(12)), *args))
    torch.library.opcheck(ops.nm_mask, (torch.rand(3, 16, generator=gen(13)), 2, 4))
