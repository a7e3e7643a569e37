import pytest
import torch

from sparsekern import reference


@pytest.mark.parametrize("rows, cols, n, m", [(5, 124, 2, 4), (37, 264, 4, 8), (3, 12, 1, 4)])
def test_nm_mask_marks_the_lowest_of_each_group(rows, cols, n, m):
    scores = torch.rand(rows, cols)
    mask = reference.nm_mask(scores, n, m)
    groups, marked = scores.reshape(rows, -1, m), mask.reshape(rows, -1, m)
    assert (marked.sum(-1) == n).all()
    kept_min = torch.where(marked, torch.inf, groups).min(-1).values
    pruned_max = torch.where(marked, groups, -torch.inf).max(-1).values
    assert (pruned_max <= kept_min).all()


def test_row_and_tensor_masks():
    scores = torch.rand(7, 123)
    row = reference.row_mask(scores, 40)
    assert (row.sum(1) == 40).all()
    assert (torch.where(row, scores, -1).max(1).values <= torch.where(row, 2, scores).min(1).values).all()
    whole = reference.tensor_mask(scores, 300)
    assert whole.sum() == 300
    assert scores[whole].max() <= scores[~whole].min()
    assert not reference.row_mask(scores, 0).any() and not reference.tensor_mask(scores, 0).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sparsity, n, m", [(0.5, 0, 0), (0.6, 0, 0), (0.5, 2, 4), (0.5, 4, 8)])
def test_wanda_scores_weight_times_input_norm(dtype, sparsity, n, m):
    torch.manual_seed(0)
    rows, cols = 37, 264
    weight = torch.randn(rows, cols).to(dtype)
    norm = torch.rand(cols) * 10
    original = weight.clone()
    mask = reference.wanda_prune(weight, norm, sparsity, n, m)
    assert torch.equal(weight, original.masked_fill(mask, 0))
    score = original.float().abs() * norm
    if n:
        assert (mask.reshape(rows, -1, m).sum(-1) == n).all()
    else:
        assert (mask.sum(1) == round(cols * sparsity)).all()
        # Within each row the pruned scores are the lowest.
        assert (torch.where(mask, score, -1).max(1).values <= torch.where(mask, torch.inf, score).min(1).values).all()


def test_wanda_differs_from_magnitude_when_inputs_differ():
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    norm = torch.tensor([10.0, 10.0, 0.1, 0.1])
    mask = reference.wanda_prune(weight.clone(), norm, 0.5)
    assert mask.tolist() == [[False, False, True, True]]
    magnitude = reference.magnitude_prune(weight.clone(), 0.5)
    assert magnitude.tolist() == [[True, True, False, False]]


def test_magnitude_is_per_layer_for_unstructured():
    weight = torch.tensor([[0.1, 0.2, 0.3, 0.4], [5.0, 6.0, 7.0, 8.0]])
    mask = reference.magnitude_prune(weight, 0.5)
    assert mask[0].all() and not mask[1].any()
    assert (weight[0] == 0).all()


def test_quantize_round_trip_on_grid():
    weight = torch.randn(4, 30)
    scale, zero = reference.minmax_params(weight, 4)
    q = reference.quantize(weight, scale, zero, 4)
    assert torch.equal(reference.quantize(q, scale, zero, 4), q)
    assert ((q - weight).abs() <= scale.unsqueeze(1) / 2 + 1e-6).all()
    assert torch.equal(reference.quantize(torch.zeros(4, 3), scale, zero, 4), torch.zeros(4, 3))


def test_selection_is_exact_under_ties():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.5, 2.0], [3.0, 3.0, 3.0, 3.0, 3.0, 3.0]])
    mask = reference.row_mask(scores, 3)
    assert mask.sum(1).tolist() == [3, 3]
    assert mask[0, 4] and not mask[0, 5]
    whole = reference.tensor_mask(torch.ones(5, 7), 11)
    assert whole.sum() == 11
    assert reference.row_mask(scores, 6).all() and not reference.row_mask(scores, 0).any()
