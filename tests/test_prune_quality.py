"""The methods on one layer with correlated inputs: the layer-output error ||WX - W'X|| must rank
SparseGPT < Wanda < magnitude, for unstructured and N:M patterns."""

import pytest
import torch

from sparsekern.patterns import SparsityPattern
from sparsekern.prune import HessianStats, NormStats, make_method


def correlated_inputs(tokens, cols, seed):
    """Low-rank correlated activations plus noise, with log-normal channel scales and a few outlier channels
    (x20), as in LLM layers."""
    gen = torch.Generator().manual_seed(seed)
    rank = cols // 4
    latent = torch.randn(tokens, rank, generator=gen) @ torch.randn(rank, cols, generator=gen) / rank**0.5
    channel_scale = torch.exp(0.5 * torch.randn(cols, generator=gen))
    channel_scale[torch.randperm(cols, generator=gen)[:4]] *= 20
    return (latent + 0.3 * torch.randn(tokens, cols, generator=gen)) * channel_scale


def prune_one(method_name, weight, x, pattern, **options):
    method = make_method(method_name, **options)
    prepared = None
    if method.stats is not None:
        stats = method.new_stats(x.shape[1], x.device, "layer")
        for chunk in x.split(100):
            stats.add(chunk)
        prepared = method.prepare(stats, "layer")
    return method.prune_linear(weight.clone(), prepared, pattern, "layer").weight


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spec", ["0.5", "2:4", "4:8", "0.7"])
def test_output_error_ranks_sparsegpt_wanda_magnitude(spec, seed):
    rows, cols, tokens = 48, 128, 1024
    x = correlated_inputs(tokens, cols, seed)
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(100 + seed))
    pattern = SparsityPattern.parse(spec)
    dense_out = x @ weight.T
    errors = {
        name: ((x @ prune_one(name, weight, x, pattern).T) - dense_out).norm().item()
        for name in ["sparsegpt", "wanda", "magnitude"]
    }
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_joint_quantization_compensates_rounding():
    """Quantizing inside the sweep (errors compensated) beats rounding the pruned layer afterwards."""
    from sparsekern.reference import minmax_params, quantize

    rows, cols, tokens = 32, 128, 1024
    x = correlated_inputs(tokens, cols, 5)
    weight = torch.randn(rows, cols)
    pattern = SparsityPattern.parse("0.5")
    dense_out = x @ weight.T
    pruned = prune_one("sparsegpt", weight, x, pattern)
    joint = prune_one("sparsegpt", weight, x, pattern, wbits=4)
    rounded_after = torch.where(pruned == 0, 0.0, quantize(pruned, *minmax_params(pruned, 4), 4))
    err_pruned = ((x @ pruned.T) - dense_out).norm()
    err_joint = ((x @ joint.T) - dense_out).norm()
    err_rounded_after = ((x @ rounded_after.T) - dense_out).norm()
    assert err_pruned < err_joint < err_rounded_after
    assert (joint == 0).float().mean() >= 0.5


def test_stats_refuse_nan_activations_naming_the_layer():
    stats = HessianStats(8, torch.device("cpu"), "model.layers.4.mlp.up_proj")
    with pytest.raises(FloatingPointError, match=r"model\.layers\.4\.mlp\.up_proj.*NaN"):
        stats.add(torch.tensor([[float("nan")] * 8]))
    norms = NormStats(8, torch.device("cpu"), "model.layers.4.mlp.up_proj")
    with pytest.raises(FloatingPointError, match="model.layers.4"):
        norms.add(torch.full((2, 8), float("inf")))


def test_non_positive_definite_hessian_warns_then_fails_naming_the_layer():
    from sparsekern.reference import NotPositiveDefiniteError

    stats = HessianStats(6, torch.device("cpu"), "model.layers.2.self_attn.q_proj")
    stats.hessian = torch.eye(6)
    stats.hessian[0, 0] = -0.03
    method = make_method("sparsegpt")
    with pytest.warns(UserWarning, match=r"model\.layers\.2\.self_attn\.q_proj.*not positive definite"):
        method.prepare(stats, "model.layers.2.self_attn.q_proj")
    stats.hessian = -torch.eye(6)
    with pytest.raises(NotPositiveDefiniteError, match=r"model\.layers\.2\.self_attn\.q_proj.*--percdamp"):
        method.prepare(stats, "model.layers.2.self_attn.q_proj")


def test_method_options_are_checked():
    with pytest.raises(ValueError, match="unknown method"):
        make_method("obs")
    with pytest.raises(ValueError, match="--wbits is not an option of the chosen steps"):
        make_method("wanda", wbits=4)
    with pytest.raises(ValueError, match="groupsize only applies"):
        make_method("sparsegpt", groupsize=64)
    with pytest.raises(ValueError, match="divide --blocksize"):
        make_method("sparsegpt", wbits=4, groupsize=96)
