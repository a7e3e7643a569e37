"""SparseLinear and sparsify: compressed 2:4 and bitmap layers that compute what the masked-dense layers did."""

import json

import pytest
import torch
from checks import assert_close

import sparsekern
from sparsekern.nn import SparseLinear, dispatch, is_24, sparsify, sparsify_like
from sparsekern.reference.masks import nm_mask


def pruned_linear(in_features=64, out_features=24, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=bias).to(dtype)
    with torch.no_grad():
        linear.weight.masked_fill_(nm_mask(linear.weight.abs().float(), 2, 4), 0)
    return linear


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(64, 24), (36, 5), (260, 37)])
def test_from_dense_computes_the_masked_dense_layer(shape, bias):
    linear = pruned_linear(*shape, bias=bias)
    layer = SparseLinear.from_dense(linear)
    assert layer.values.shape == (shape[1], shape[0] // 2) and layer.meta.dtype == torch.int32
    x = torch.randn(2, 3, shape[0])
    assert_close(layer(x), linear(x), "SparseLinear vs nn.Linear", atol=1e-5)
    dense = layer.to_dense()
    assert torch.equal(dense.weight, linear.weight)


def test_non_24_layer_is_refused_by_name():
    linear = torch.nn.Linear(8, 4)
    with pytest.raises(ValueError, match=r"model.layers.3.mlp.up_proj.weight is not 2:4: row 0, columns 0..3"):
        SparseLinear.from_dense(linear, "model.layers.3.mlp.up_proj", format="2:4")
    with pytest.raises(ValueError, match=r"model.layers.3.mlp.up_proj.weight \(4x8, 0.0% zeros\) would not be at "
                                         r"least 25% smaller in any sparse format"):
        SparseLinear.from_dense(linear, "model.layers.3.mlp.up_proj")
    with pytest.raises(ValueError, match="multiple of 4"):
        SparseLinear(6, 4)


def test_sparsify_tiny_llama_keeps_its_logits(tiny_llama):
    calibration = torch.randint(0, 129, (2, 16), generator=torch.Generator().manual_seed(0))
    sparsekern.prune(tiny_llama, method="magnitude", sparsity="2:4", progress=False)
    ids = calibration[:1]
    with torch.no_grad():
        expected = tiny_llama(ids).logits
    replaced = sparsekern.sparsify(tiny_llama)  # the top-level name
    assert len(replaced) == 2 * 7 and all("layers" in name for name in replaced)  # lm_head is dense: kept
    assert isinstance(tiny_llama.model.layers[0].mlp.down_proj, SparseLinear)
    with torch.no_grad():
        got = tiny_llama(ids).logits
    assert_close(got, expected, "logits", atol=1e-4, rtol=1e-4)


def test_state_dict_round_trip_and_compile():
    model = torch.nn.Sequential(pruned_linear(64, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8))
    sparsify(model)
    state = model.state_dict()
    assert {"0.values", "0.meta", "0.bias", "2.weight"} <= set(state) and "0.weight" not in state
    fresh = torch.nn.Sequential(torch.nn.Linear(64, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8))
    assert sparsify_like(fresh, state) == ["0"]
    fresh.load_state_dict(state)
    x = torch.randn(5, 64)
    assert torch.equal(fresh(x), model(x))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), model(x), "compiled", atol=1e-5)


def test_sparsify_with_a_filter_names_a_dense_layer():
    model = torch.nn.Sequential(pruned_linear(64, 24), torch.nn.Linear(24, 8))
    with pytest.raises(ValueError, match=r"^1.weight is not 2:4"):
        sparsify(model, filter_fn=lambda name, linear: True, format="2:4")
    assert sparsify(model, filter_fn=lambda name, linear: name == "0") == ["0"]
    assert is_24(model[0].to_dense().weight) and not is_24(model[1].weight)


def test_dispatch_rules(tmp_path, monkeypatch):
    assert dispatch.choose(((16, "triton"), (None, "dense")), 1) == "triton"
    assert dispatch.choose(((16, "triton"), (None, "dense")), 17) == "dense"
    assert dispatch.choose(((16, "triton"), (128, "semi_structured"), (None, "dense")), 64) == "semi_structured"
    monkeypatch.setenv("SPARSEKERN_CACHE", str(tmp_path))  # the measured table lives in the user's cache
    assert dispatch.table_path() == tmp_path / "dispatch_table.json"
    dispatch.table_path().write_text(json.dumps({"entries": [
        {"device": "GPU X", "dtype": "float16", "n": 8, "k": 16, "rules": [[4, "triton"], [None, "dense"]]},
        {"device": "GPU X", "format": "bitmap", "sparsity": 0.68, "dtype": "float16", "n": 8, "k": 16,
         "rules": [[16, "triton"], [None, "dense"]]}]}))
    dispatch.clear_caches()
    try:
        assert dispatch._table()[("GPU X", "2:4", "float16", 8, 16, None)] == ((4, "triton"), (None, "dense"))
        assert dispatch._table()[("GPU X", "bitmap", "float16", 8, 16, 0.7)] == ((16, "triton"), (None, "dense"))
        assert dispatch.rules_for(torch.device("cpu"), "2:4", torch.float16, 8, 16) == ((None, "dense"),)
    finally:
        dispatch.clear_caches()


def test_a_damaged_dispatch_table_is_reported_once_and_ignored(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPARSEKERN_CACHE", str(tmp_path))
    dispatch.table_path().write_text("{not json")
    dispatch.clear_caches()
    try:
        assert dispatch._table() == {} and dispatch._table() == {}
        assert capsys.readouterr().err.count("cannot be read") == 1
    finally:
        dispatch.clear_caches()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_path_under_the_interpreter(interpret, dtype):
    """On the interpret backend SparseLinear runs the Triton kernels (compression and GEMM)."""
    linear = pruned_linear(68, 37, dtype=dtype)
    layer = SparseLinear.from_dense(linear)
    assert dispatch.rules_for(torch.device("cpu"), "2:4", dtype, 37, 68) == ((None, "triton"),)
    x = torch.randn(3, 68).to(dtype)
    expected = (x.float() @ linear.weight.float().T + linear.bias.float())
    tolerance = 1e-2 if dtype == torch.float16 else 3e-2
    assert_close(layer(x).float(), expected, "kernel SparseLinear", atol=tolerance, rtol=tolerance)


def test_sparsified_tiny_llama_on_the_kernels(tiny_llama, interpret):
    sparsekern.prune(tiny_llama, method="magnitude", sparsity="2:4", progress=False)
    ids = torch.randint(0, 129, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = tiny_llama(ids).logits
        sparsify(tiny_llama)
        got = tiny_llama(ids).logits
    assert_close(got, expected, "logits", atol=1e-4, rtol=1e-4)


# -- channel-permuted layers: W is 2:4 in a permuted input order, the layer still computes x @ W^T -------------


def permuted_linear(in_features=68, out_features=37, bias=True, dtype=torch.float32, seed=0):
    """(linear, perm): a linear whose weight is 2:4 in the order perm (weight[:, perm]), not in its own order."""
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    perm = torch.randperm(in_features)
    with torch.no_grad():
        permuted = linear.weight[:, perm]
        permuted.masked_fill_(nm_mask(permuted.abs(), 2, 4), 0)
        linear.weight[:, perm] = permuted
    linear = linear.to(dtype)
    assert not is_24(linear.weight) and is_24(linear.weight[:, perm])
    return linear, perm


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 5, 33])
def test_permuted_layer_on_the_kernels(interpret, poisoned_outputs, m, dtype, bias):
    """Triton path (interpreter): the permuted compressed layer computes the masked-dense layer in original order."""
    linear, perm = permuted_linear(bias=bias, dtype=dtype, seed=m)
    layer = SparseLinear.from_dense(linear, "up_proj", perm=perm)
    assert layer.perm.dtype == torch.int32 and torch.equal(layer.perm.long(), perm)
    x = torch.randn(m, 68).to(dtype)
    expected = x.float() @ linear.weight.float().T + (linear.bias.float() if bias else 0)
    tolerance = {torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float32: 1e-4}[dtype]
    got = layer(x)
    assert got.dtype == dtype
    assert_close(got.float(), expected, f"permuted SparseLinear M={m}", atol=tolerance, rtol=tolerance)
    assert torch.equal(layer.to_dense().weight, linear.weight)  # the original order back


@pytest.mark.parametrize("impl", ["dense", "semi_structured"])
def test_permuted_layer_on_the_other_implementations(monkeypatch, impl):
    """Dense (decompress + F.linear) and semi-structured take x gathered through perm first. The semi-structured
    weight needs CUDA: here the dense compressed-order weight stands in for it, which checks the gather."""
    linear, perm = permuted_linear(bias=True)
    layer = SparseLinear.from_dense(linear, perm=perm)
    monkeypatch.setattr(dispatch, "choose", lambda rules, m: impl)
    monkeypatch.setattr(SparseLinear, "_semi_structured_weight",
                        lambda self: sparsekern.ops.decompress_24(self.values, self.meta))
    x = torch.randn(2, 5, 68)
    assert_close(layer(x), linear(x), f"permuted SparseLinear ({impl})", atol=1e-5)


def test_permuted_state_dict_sparsify_and_compile():
    linear, perm = permuted_linear(64, 24, seed=3)
    model = torch.nn.Sequential(linear, torch.nn.ReLU(), torch.nn.Linear(24, 8))
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = model(x)
    assert sparsify(model, format="2:4") == []  # not 2:4 in its own order
    with pytest.raises(ValueError, match=r"^0.weight\[:, perm\] is not 2:4"):
        sparsify(model, filter_fn=lambda name, lin: name == "0", perms={"0": perm.roll(1)})
    with pytest.raises(ValueError, match=r"not nn.Linear layers of the model: \['9'\]"):
        sparsify(model, perms={"9": perm})
    assert sparsify(model, perms={"0": perm}) == ["0"]
    assert model[0].perm is not None and "channel-permuted" in repr(model[0])
    state = model.state_dict()
    assert {"0.values", "0.meta", "0.perm"} <= set(state)
    fresh = torch.nn.Sequential(torch.nn.Linear(64, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8))
    assert sparsify_like(fresh, state) == ["0"]
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert_close(fresh(x), expected, "reloaded permuted model", atol=1e-5)
        compiled = torch.compile(fresh, fullgraph=True, backend="aot_eager")
        assert_close(compiled(x), expected, "compiled permuted model", atol=1e-5)


def test_bad_perm_is_refused_by_name():
    linear, perm = permuted_linear()
    with pytest.raises(ValueError, match=r"layers.0.mlp.down_proj: perm is not a permutation of 0..67"):
        SparseLinear.from_dense(linear, "layers.0.mlp.down_proj", perm=perm.clamp(max=66))
    with pytest.raises(ValueError, match=r"layers.0.mlp.down_proj: perm must be an integer tensor \[68\]"):
        SparseLinear.from_dense(linear, "layers.0.mlp.down_proj", perm=perm[:64])
    with pytest.raises(ValueError, match=r"layers.0.mlp.down_proj.weight\[:, perm\] is not 2:4"):
        SparseLinear.from_dense(linear, "layers.0.mlp.down_proj", perm=torch.arange(68))


def test_nm_permutation_end_to_end(interpret):
    """Scores -> nm_permutation -> 2:4 prune in that order -> SparseLinear: more score kept, same outputs."""
    from sparsekern.permute import kept_score, nm_permutation

    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 48)
    norms = torch.exp(torch.randn(128)) * (1 + 20 * (torch.rand(128) < 0.05))  # channel norms with outliers
    scores = linear.weight.detach().abs() * norms
    perm = nm_permutation(scores, 2, 4)
    assert kept_score(scores, perm, 2, 4) > kept_score(scores, None, 2, 4)
    with torch.no_grad():
        permuted = linear.weight[:, perm]
        permuted.masked_fill_(nm_mask(scores[:, perm], 2, 4), 0)
        linear.weight[:, perm] = permuted
    layer = SparseLinear.from_dense(linear.half(), perm=perm)
    x = torch.randn(3, 128).half()
    assert_close(layer(x).float(), linear(x).float(), "nm_permutation layer", atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("checked", [True, False])
def test_unmeasured_gpu_shapes_use_the_checked_kernel_and_say_so_once(tmp_path, monkeypatch, capsys, checked):
    """No CUDA here: the GPU's name, the backend and the kernel check are stand-ins; the lookup logic is real."""
    monkeypatch.setenv("SPARSEKERN_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "GPU X")
    monkeypatch.setattr(dispatch, "get_backend", lambda: "cuda")
    monkeypatch.setattr(dispatch, "_kernel_checked", lambda index, fmt, dtype: checked)
    monkeypatch.setattr(dispatch, "_warned", set())
    dispatch.clear_caches()
    try:
        first = dispatch._cuda_rules(0, "bitmap", torch.float16, 4096, 4096, 0.7)
        second = dispatch._cuda_rules(0, "2:4", torch.float16, 11008, 4096, None)
        assert first == second == (dispatch.DEFAULT_RULES if checked else dispatch.FALLBACK_RULES)
        err = capsys.readouterr().err
        if checked:
            assert err.count("is not measured on GPU X") == 1 and "bitmap at 70% float16 N=4096 K=4096" in err
            assert "sparsekern bench --write-table" in err
        else:
            assert err.count("did not give the reference's result on GPU X") == 1
        bench_entry = {"device": "GPU X", "format": "bitmap", "sparsity": 0.7, "dtype": "float16", "n": 4096,
                       "k": 4096, "rules": [[4, "triton"], [None, "dense"]]}
        from sparsekern import bench

        assert bench.write_table([bench_entry]) == tmp_path / "dispatch_table.json"
        assert dispatch._cuda_rules(0, "bitmap", torch.float16, 4096, 4096, 0.7) == ((4, "triton"), (None, "dense"))
        assert capsys.readouterr().err == ""
    finally:
        dispatch.clear_caches()


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9])
def test_bitmap_layer_computes_the_masked_dense_layer(sparsity):
    torch.manual_seed(0)
    linear = torch.nn.Linear(150, 37)
    with torch.no_grad():
        linear.weight.masked_fill_(torch.rand_like(linear.weight) < sparsity, 0)
    layer = SparseLinear.from_dense(linear, "up_proj")
    assert layer.format == "bitmap" and layer.sparsity == pytest.approx(float((linear.weight == 0).float().mean()))
    assert f"bitmap {layer.sparsity:.1%} sparse" in repr(layer)
    assert layer.weight_nbytes() < 0.75 * linear.weight.numel() * 4
    x = torch.randn(2, 3, 150)
    assert_close(layer(x), linear(x), "bitmap SparseLinear", atol=1e-5)
    assert torch.equal(layer.to_dense().weight, linear.weight)


def test_sparsify_picks_the_format_by_pattern_and_size():
    torch.manual_seed(0)
    model = torch.nn.Sequential(pruned_linear(64, 24), torch.nn.Linear(64, 24), torch.nn.Linear(64, 24),
                                torch.nn.Linear(64, 24))
    with torch.no_grad():
        model[1].weight.masked_fill_(torch.rand(24, 64) < 0.7, 0)  # 70% unstructured: bitmap
        model[2].weight.masked_fill_(torch.rand(24, 64) < 0.1, 0)  # 10%: not worth compressing
    assert sparsify(model) == ["0", "1"]
    assert (model[0].format, model[1].format, type(model[2]), type(model[3])) == (
        "2:4", "bitmap", torch.nn.Linear, torch.nn.Linear)
    assert sparsify(model, filter_fn=lambda name, linear: name == "2") == ["2"]  # asked for: compressed anyway
    assert model[2].format == "bitmap"
    state = model.state_dict()
    fresh = torch.nn.Sequential(*(torch.nn.Linear(64, 24) for _ in range(4)))
    assert sparsify_like(fresh, state) == ["0", "1", "2"]
    fresh.load_state_dict(state)
    x = torch.randn(5, 64)
    assert all(torch.equal(fresh[i](x), model[i](x)) for i in range(4))  # parallel layers, not a chain


def test_a_tied_linear_stays_dense():
    embedding = torch.nn.Embedding(24, 64)
    head = torch.nn.Linear(64, 24, bias=False)
    head.weight = embedding.weight
    with torch.no_grad():
        embedding.weight.masked_fill_(torch.rand(24, 64) < 0.7, 0)
    model = torch.nn.ModuleDict({"embed": embedding, "head": head})
    assert sparsify(model) == []
