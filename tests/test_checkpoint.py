"""Compressed checkpoints: sparsify + save + sparsekern.load gives the masked-dense logits; decompress gives the dense
save back bit for bit; other format versions and damaged tensors are refused with a clear message."""

import json

import pytest
import torch
from checks import assert_close
from checks import run_cli as run
from safetensors.torch import load_file, save_file

import sparsekern
from sparsekern import checkpoint
from sparsekern.models import save_checkpoint
from sparsekern.nn import SparseLinear


def pruned_tiny_llama(tie: bool = False):
    """A 2-layer random Llama, layer 0 pruned 60% unstructured (bitmap) and layer 1 2:4, the lm_head dense."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=129, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tie)
    model = LlamaForCausalLM(config).eval()
    sparsekern.prune(model, method="magnitude", sparsity=0.6, overrides={"*.layers.1.*": "2:4"}, progress=False)
    return model


def logits(model, seed: int = 0):
    ids = torch.randint(0, 129, (2, 11), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("tie", [False, True])
def test_save_and_load_give_the_masked_dense_logits(tmp_path, char_tokenizer, tie):
    model = pruned_tiny_llama(tie)
    expected = logits(model)
    sizes = checkpoint.save_compressed(model, char_tokenizer, tmp_path / "c")
    assert sizes["compressed_linears"] == {"bitmap": 7, "2:4": 7}  # the lm_head (and tied embeddings) stay dense
    assert sizes["ratio"] < 1
    loaded, tokenizer = sparsekern.load(tmp_path / "c")
    assert tokenizer("ab").input_ids == [97, 98]
    layers = {name: m for name, m in loaded.named_modules() if isinstance(m, SparseLinear)}
    assert {m.format for name, m in layers.items() if ".layers.0." in name} == {"bitmap"}
    assert {m.format for name, m in layers.items() if ".layers.1." in name} == {"2:4"}
    assert not any(name.endswith(("proj.weight")) for name in loaded.state_dict())  # no dense weight built
    assert_close(logits(loaded), expected, "logits of the loaded compressed model", atol=1e-5, rtol=1e-5)
    if tie:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    manifest = json.loads((tmp_path / "c" / "sparsekern.json").read_text())
    assert manifest["format_version"] == checkpoint.FORMAT_VERSION and len(manifest["layers"]) == 14


def test_load_of_a_dense_folder_sparsifies_it(tmp_path, char_tokenizer):
    model = pruned_tiny_llama()
    expected = logits(model)
    save_checkpoint(model, char_tokenizer, tmp_path / "d")
    loaded, _ = sparsekern.load(tmp_path / "d")
    assert sum(isinstance(m, SparseLinear) for m in loaded.modules()) == 14
    assert_close(logits(loaded), expected, "logits of the sparsified dense checkpoint", atol=1e-5, rtol=1e-5)


def test_compress_then_decompress_is_bit_identical_to_the_dense_save(tmp_path, capsys, char_tokenizer):
    model = pruned_tiny_llama(tie=True)
    save_checkpoint(model, char_tokenizer, tmp_path / "dense", {"sparsity.json": {"method": "magnitude"}})
    code, stdout, _ = run(capsys, "compress", tmp_path / "dense", "--out", tmp_path / "c", "--json")
    assert code == 0, stdout
    sizes = json.loads(stdout)
    assert sizes["file_bytes"]["weights"] < (tmp_path / "dense" / "model.safetensors").stat().st_size
    assert json.loads((tmp_path / "c" / "sparsity.json").read_text()) == {"method": "magnitude"}
    code, stdout, _ = run(capsys, "decompress", tmp_path / "c", "--out", tmp_path / "back", "--json")
    assert code == 0, stdout
    dense = load_file(tmp_path / "dense" / "model.safetensors")
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert dense.keys() == back.keys()
    for name in dense:
        assert dense[name].dtype == back[name].dtype and torch.equal(dense[name].view(torch.int32),
                                                                     back[name].view(torch.int32)), name
    assert (tmp_path / "dense" / "model.safetensors").read_bytes() == (tmp_path / "back" / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads(
        (tmp_path / "dense" / "config.json").read_text())


def test_permuted_24_layers_round_trip(tmp_path, char_tokenizer):
    """A layer 2:4 only in a permuted input order is stored with its perm and computes the original layer."""
    from sparsekern.reference.masks import nm_mask

    model = pruned_tiny_llama()
    linear = model.model.layers[0].mlp.up_proj
    perm = torch.randperm(linear.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        permuted = linear.weight[:, perm].clone()
        permuted.masked_fill_(nm_mask(permuted.abs(), 2, 4), 0)
        linear.weight.zero_()
        linear.weight[:, perm] = permuted
    expected = logits(model)
    name = "model.layers.0.mlp.up_proj"
    save_checkpoint(model, char_tokenizer, tmp_path / "dense", extra_tensors={"permutations.safetensors": {name: perm}})
    checkpoint.save_compressed(model, char_tokenizer, tmp_path / "c", perms={name: perm})
    loaded, _ = sparsekern.load(tmp_path / "c")
    layer = loaded.get_submodule(name)
    assert layer.format == "2:4" and torch.equal(layer.perm.long(), perm)
    assert_close(logits(loaded), expected, "logits with a permuted layer", atol=1e-5, rtol=1e-5)
    checkpoint.decompress_checkpoint(tmp_path / "c", tmp_path / "back")
    assert torch.equal(load_file(tmp_path / "back" / "permutations.safetensors")[name], perm)
    dense, back = (load_file(tmp_path / f / "model.safetensors") for f in ("dense", "back"))
    assert all(torch.equal(dense[k], back[k]) for k in dense)


@pytest.fixture
def compressed(tmp_path, char_tokenizer):
    checkpoint.save_compressed(pruned_tiny_llama(), char_tokenizer, tmp_path / "c")
    return tmp_path / "c"


def test_another_format_version_is_refused(compressed):
    manifest = json.loads((compressed / "sparsekern.json").read_text())
    (compressed / "sparsekern.json").write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(ValueError, match=r"format version 2; this sparsekern reads version 1 only"):
        sparsekern.load(compressed)
    (compressed / "sparsekern.json").write_text("{")
    with pytest.raises(ValueError, match=r"sparsekern.json cannot be read .* the checkpoint is damaged"):
        sparsekern.load(compressed)


def _rewrite(folder, change):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, str(path))


def _flip_a_bitmap_bit(tensors):
    tensors["model.layers.0.mlp.up_proj.bitmap"][3, 0] ^= 1 << 5


def _damage_offsets(tensors):
    tensors["model.layers.0.self_attn.q_proj.offsets"][1, 0] += 1


def _damage_meta(tensors):
    tensors["model.layers.1.mlp.down_proj.meta"][0, 0] = 0  # every group decodes to positions (0, 0)


def _truncate_values(tensors):
    name = "model.layers.0.mlp.up_proj.values"
    tensors[name] = tensors[name][:-1].clone()


def _wrong_shape(tensors):
    name = "model.layers.1.mlp.up_proj.values"
    tensors[name] = tensors[name][:, :-2].clone()


def _drop_a_tensor(tensors):
    del tensors["model.norm.weight"]


@pytest.mark.parametrize("damage, message", [
    (_flip_a_bitmap_bit, r"model.layers.0.mlp.up_proj: bitmap marks \d+ kept weights but values holds \d+"),
    (_damage_offsets, r"model.layers.0.self_attn.q_proj: offsets are damaged \(row 1, tile 0"),
    (_damage_meta, r"model.layers.1.mlp.down_proj: meta is damaged \(row 0, group 0"),
    (_truncate_values, r"model.layers.0.mlp.up_proj: bitmap marks \d+ kept weights but values holds \d+"),
    (_wrong_shape, r"model.layers.1.mlp.up_proj.values is float32 \(96, 30\), the model expects float32 \(96, 32\)"),
    (_drop_a_tensor, r"lacks \['model.norm.weight'\]: the checkpoint is incomplete"),
])
def test_a_damaged_tensor_is_refused(compressed, damage, message):
    _rewrite(compressed, damage)
    with pytest.raises(ValueError, match=message):
        sparsekern.load(compressed)


def test_a_truncated_file_is_refused(compressed):
    path = compressed / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model.safetensors cannot be read .* the checkpoint is damaged"):
        sparsekern.load(compressed)


def test_cli_prune_compressed_then_eval_and_generate(capsys, tmp_path, tiny_folder, text_file):
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, "prune", tiny_folder, "--method", "wanda", "--sparsity", "0.6", "--calib", text_file,
                          "--nsamples", 2, "--seqlen", 16, "--save-format", "compressed", "--out", out, "--quiet")
    assert code == 0, stdout
    assert "compressed linears: 14 bitmap" in stdout
    assert (out / "sparsekern.json").is_file() and (out / "sparsity.json").is_file()
    code, stdout, _ = run(capsys, "eval", out, "--data", text_file, "--seqlen", 32, "--json", "--quiet")
    assert code == 0 and json.loads(stdout)["perplexity"] > 1
    code, stdout, _ = run(capsys, "generate", out, "--prompt", "abc", "--max-new-tokens", 3, "--temperature", 0,
                          "--json")
    assert code == 0 and json.loads(stdout)["prompt"] == "abc"
    code, _, stderr = run(capsys, "decompress", tiny_folder, "--out", tmp_path / "x")
    assert code == 2 and "is not a compressed checkpoint (no sparsekern.json)" in stderr


def test_loaded_model_runs_the_kernels(tmp_path, char_tokenizer, interpret):
    """Under the interpreter the loaded layers run the Triton kernels (bitmap_linear and sparse24_linear)."""
    model = pruned_tiny_llama()
    expected = logits(model)
    checkpoint.save_compressed(model, char_tokenizer, tmp_path / "c")
    loaded, _ = sparsekern.load(tmp_path / "c")
    assert_close(logits(loaded), expected, "logits on the kernels", atol=1e-4, rtol=1e-4)


def test_a_checkpoint_without_a_tokenizer_loads_with_none(tmp_path):
    model = pruned_tiny_llama()
    checkpoint.save_compressed(model, None, tmp_path / "c")
    loaded, tokenizer = sparsekern.load(tmp_path / "c")
    assert tokenizer is None and sum(isinstance(m, SparseLinear) for m in loaded.modules()) == 14
