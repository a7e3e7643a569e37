"""The sequential driver (sparsekern/pipeline.py) on many Hugging Face architectures, built from tiny random configs.

What is proven here, per architecture:
* capture is exact: re-running the decoder layers one by one from the recorded first-layer input and per-layer
  calls reproduces the model's own hidden states (and for the sliding/full-attention models, reusing layer 0's
  call for every layer does not, so the per-layer arguments really matter);
* every method x pattern prunes every decoder linear to the requested sparsity (N:M along the input dimension,
  also for GPT-2's transposed Conv1D), touches nothing else, and leaves a model that still runs;
* input groups and true-sequential pruning, offload/mode bookkeeping, overrides and error messages, and a
  non-HF model whose layers return tuples.

Everything runs on CPU in fp32 with no hub access.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

import sparsekern
from sparsekern.pipeline import (
    capture_layer_inputs,
    find_decoder_layers,
    find_linears,
    input_groups,
    prune_layers,
)
from sparsekern.patterns import SparsityPattern
from sparsekern.prune import make_method

VOCAB = 128
SEQLEN = 16
NSAMPLES = 4
BATCH = 2  # two calibration batches, so per-batch bookkeeping is exercised
SLIDING_WINDOW = 4  # below SEQLEN: sliding-window and full-attention layers see different masks


# -- tiny models -------------------------------------------------------------------------------------------


def _llama_like(config_cls, model_cls, vocab_size=VOCAB, **extra):
    config = config_cls(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, **extra,
    )
    return model_cls(config)


def _gemma(config_cls, model_cls, vocab_size=VOCAB):
    # Layer 0 slides (window 4), layer 1 attends fully; Gemma 3 also gives them different rotary bases.
    return _llama_like(
        config_cls, model_cls, vocab_size, head_dim=8, sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention"],
    )


BUILDERS = {
    "llama": lambda: _llama_like(transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": lambda: _llama_like(transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": lambda: _llama_like(transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "opt": lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=32, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=1,
    )),
    "gpt_neox": lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
    )),
    "gemma2": lambda: _gemma(transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
    "gemma3": lambda: _gemma(transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    # phi-2 style: parallel attention and MLP reading one layernorm output, partial rotary.
    "phi": lambda: _llama_like(transformers.PhiConfig, transformers.PhiForCausalLM, partial_rotary_factor=0.5),
}
ARCHS = list(BUILDERS)
SLIDING_ARCHS = ["gemma2", "gemma3"]


def build(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return BUILDERS[arch]().float().eval()


def calibration_ids(seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (NSAMPLES, SEQLEN), generator=generator)


def matrix(linear: nn.Module) -> torch.Tensor:
    """[out, in] view of a linear's weight, written independently of the driver's helper."""
    return linear.weight.t() if isinstance(linear, Conv1D) else linear.weight


def matrix_of(weight: torch.Tensor, linear: nn.Module) -> torch.Tensor:
    """The same [out, in] view of a saved copy of ``linear``'s weight."""
    return weight.t() if isinstance(linear, Conv1D) else weight


def first(output):
    return output if isinstance(output, torch.Tensor) else output[0]


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Full name -> module for every linear inside the decoder layers."""
    layers_name, layers = find_decoder_layers(model)
    return {
        f"{layers_name}.{index}.{name}": module
        for index, layer in enumerate(layers)
        for name, module in layer.named_modules()
        if isinstance(module, (nn.Linear, Conv1D))
    }


def run_layers(layers, hidden, calls, call_for=None):
    """Drive the layers one by one from the captured inputs; returns [layer input per layer..., last output]."""
    states = [torch.cat(hidden)]
    current = list(hidden)
    for index, layer in enumerate(layers):
        chosen = calls[index] if call_for is None else calls[call_for(index)]
        current = [first(call(layer, h)) for call, h in zip(chosen, current)]
        states.append(torch.cat(current))
    return states


def capture(model, ids):
    name, layers = find_decoder_layers(model)
    with torch.no_grad():
        hidden, calls = capture_layer_inputs(model, layers, list(ids.split(BATCH)), torch.device("cpu"))
    return name, layers, hidden, calls


# -- 1. capture is exact -----------------------------------------------------------------------------------


def test_find_decoder_layers_paths():
    expected = {"llama": "model.layers", "opt": "model.decoder.layers", "gpt2": "transformer.h",
                "gpt_neox": "gpt_neox.layers", "gemma3": "model.layers", "phi": "model.layers"}
    for arch, path in expected.items():
        name, layers = find_decoder_layers(build(arch))
        assert name == path and len(layers) == 2, arch


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_reproduces_hidden_states(arch):
    model = build(arch)
    ids = calibration_ids()
    _, layers = find_decoder_layers(model)
    real_outputs = []
    hooks = [layer.register_forward_hook(lambda m, a, out: real_outputs.append(first(out))) for layer in layers]
    try:
        with torch.no_grad():
            reference = model(ids, output_hidden_states=True).hidden_states
    finally:
        for hook in hooks:
            hook.remove()

    _, layers, hidden, calls = capture(model, ids)
    assert len(hidden) == NSAMPLES // BATCH
    assert [len(c) for c in calls] == [NSAMPLES // BATCH] * len(layers)
    with torch.no_grad():
        driven = run_layers(layers, hidden, calls)
    # hidden_states[i] is the input of layer i; the last entry has the final norm applied, so the last layer's
    # output is compared with what a forward hook saw during the real forward.
    for index in range(len(layers)):
        torch.testing.assert_close(driven[index], reference[index], rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{arch}: input of layer {index}: {m}")
    torch.testing.assert_close(driven[-1], real_outputs[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", SLIDING_ARCHS)
def test_capture_per_layer_kwargs_matter(arch):
    """With alternating sliding/full attention, driving every layer with layer 0's call gives other results:
    the exactness test above would catch a driver that recorded only one call."""
    model = build(arch)
    assert set(model.config.layer_types) == {"sliding_attention", "full_attention"}
    assert model.config.sliding_window < SEQLEN
    _, layers, hidden, calls = capture(model, calibration_ids())
    with torch.no_grad():
        right = run_layers(layers, hidden, calls)
        wrong = run_layers(layers, hidden, calls, call_for=lambda index: 0)
    assert torch.equal(right[1], wrong[1])  # layer 0 used its own call both times
    assert (right[2] - wrong[2]).abs().max() > 1e-2


# -- 2. every method and pattern ---------------------------------------------------------------------------


METHODS = ["sparsegpt", "wanda", "magnitude"]
PATTERNS = ["0.5", "2:4"]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_prune_every_method_and_pattern(arch, method, pattern):
    model = build(arch)
    ids = calibration_ids()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    linears = decoder_linears(model)
    pruned_weights = {f"{name}.weight" for name in linears}

    report = sparsekern.prune(model, method=method, sparsity=pattern, calib=ids, batch_size=BATCH,
                              device="cpu", progress=False)

    assert sorted(r.name for r in report.linears) == sorted(linears)
    by_name = {r.name: r for r in report.linears}
    spec = SparsityPattern.parse(pattern)
    for name, linear in linears.items():
        weight = matrix(linear).detach()
        rows, cols = weight.shape
        zeros = weight == 0
        # magnitude and wanda zero exactly what they select (random weights have no zeros of their own);
        # SparseGPT also zeroes input columns never active in calibration (possible after OPT's ReLU).
        exact = method != "sparsegpt"
        if spec.is_nm:
            per_group = zeros.reshape(rows, cols // spec.m, spec.m).sum(-1)
            assert (per_group >= spec.n).all(), f"{arch} {method}: {name} breaks {pattern} along the input dim"
            assert not exact or (per_group == spec.n).all(), f"{arch} {method}: {name}"
        else:
            # Each method removes round(0.5 * k) of every row / block / matrix of k weights; all k here are even.
            count = zeros.sum().item()
            assert count >= weight.numel() // 2, f"{arch} {method}: {name} has {count} zeros of {weight.numel()}"
            assert not exact or count == weight.numel() // 2, f"{arch} {method}: {name}"
        assert zeros.float().mean().item() <= 0.5 + 0.05, f"{arch} {method}: {name} over-pruned"
        assert by_name[name].sparsity == pytest.approx(zeros.float().mean().item())
        assert by_name[name].shape == (rows, cols)
        original = matrix_of(before[f"{name}.weight"], linear)
        if method in ("wanda", "magnitude"):  # no weight update: kept weights are the original ones
            assert torch.equal(weight[~zeros], original[~zeros]), f"{arch} {method}: {name}"
        else:
            assert not torch.equal(weight[~zeros], original[~zeros]), f"{arch}: {name} was not updated"
    # Embeddings, lm_head, norms, biases: bit for bit as before.
    for name, param in model.named_parameters():
        if name not in pruned_weights:
            assert torch.equal(param, before[name]), f"{arch} {method}: {name} changed"
    assert report.sparsity == pytest.approx(0.5, abs=0.05)
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()


def test_gpt2_conv1d_nm_groups_run_along_input_dim_zero():
    """GPT-2's Conv1D weight is [in, out]: the 2:4 groups must run down dim 0 of the stored weight."""
    model = build("gpt2")
    sparsekern.prune(model, method="magnitude", sparsity="2:4", progress=False)
    stored = model.transformer.h[0].mlp.c_fc.weight.detach()  # [in 32, out 128]
    assert stored.shape == (32, 128)
    along_in = (stored == 0).reshape(8, 4, 128).sum(1)
    assert (along_in == 2).all()
    along_out = (stored == 0).reshape(32, 32, 4).sum(-1)
    assert not (along_out == 2).all()  # the other direction would be a different (wrong) pattern


# -- 3. input groups and true_sequential -------------------------------------------------------------------


def _groups(arch):
    model = build(arch)
    _, layers, hidden, calls = capture(model, calibration_ids())
    layer = layers[0]
    with torch.no_grad():
        return input_groups(layer, find_linears(layer), lambda: calls[0][0](layer, hidden[0])), layer


def test_input_groups_llama():
    groups, _ = _groups("llama")
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_input_groups_gpt2():
    groups, _ = _groups("gpt2")
    assert groups == [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]]


def test_input_groups_phi_parallel_block_shares_input():
    groups, _ = _groups("phi")
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1"],
                      ["self_attn.dense"], ["mlp.fc2"]]


@pytest.mark.parametrize("arch", ARCHS)
def test_input_groups_cover_every_linear(arch):
    groups, layer = _groups(arch)
    flat = [name for group in groups for name in group]
    assert sorted(flat) == sorted(find_linears(layer)) and len(flat) == len(set(flat))


@pytest.mark.parametrize("arch", ["llama", "phi"])
def test_true_sequential(arch):
    ids = calibration_ids()
    plain, sequential = build(arch), build(arch)
    sparsekern.prune(plain, method="sparsegpt", sparsity=0.5, calib=ids, batch_size=BATCH, progress=False)
    report = sparsekern.prune(sequential, method="sparsegpt", sparsity=0.5, calib=ids, batch_size=BATCH,
                              true_sequential=True, progress=False)
    assert report.options["true_sequential"] is True
    groups, _ = _groups(arch)
    layer_a, layer_b = find_decoder_layers(plain)[1][0], find_decoder_layers(sequential)[1][0]
    linears_a, linears_b = find_linears(layer_a), find_linears(layer_b)
    # The first group sees the same (unpruned) inputs either way; every later group is calibrated on the
    # outputs of the already-pruned groups before it, so its weights differ.
    for name in groups[0]:
        assert torch.equal(linears_a[name].weight, linears_b[name].weight), name
    for group in groups[1:]:
        for name in group:
            assert not torch.equal(linears_a[name].weight, linears_b[name].weight), name
    for name, linear in decoder_linears(sequential).items():
        assert (matrix(linear) == 0).float().mean() >= 0.5 - 1e-3, name
    with torch.no_grad():
        assert torch.isfinite(sequential(ids).logits).all()


# -- 4. offload and mode bookkeeping -----------------------------------------------------------------------


@pytest.mark.parametrize("training,use_cache", [(True, True), (False, False)])
@pytest.mark.parametrize("method", ["sparsegpt", "magnitude"])
def test_prune_restores_modes_devices_and_identity(method, training, use_cache):
    model = build("gpt2")  # tied lm_head / wte
    model.train(training)
    model.config.use_cache = use_cache
    params = {name: (p, p.device) for name, p in model.named_parameters(remove_duplicate=False)}
    modes = {name: m.training for name, m in model.named_modules()}

    prune_layers(model, make_method(method), SparsityPattern.parse("2:4"), calibration_ids(), device="cpu",
                 batch_size=BATCH, progress=False)

    assert model.training is training and model.config.use_cache is use_cache
    assert {name: m.training for name, m in model.named_modules()} == modes
    for name, p in model.named_parameters(remove_duplicate=False):
        assert p is params[name][0] and p.device == params[name][1], name
    assert model.lm_head.weight is model.transformer.wte.weight
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(calibration_ids()).logits).all()


def test_modes_restored_after_an_error():
    model = build("llama")
    model.train()
    model.config.use_cache = True
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = float("nan")
    with pytest.raises(FloatingPointError):
        sparsekern.prune(model, method="wanda", calib=calibration_ids(), progress=False)
    assert model.training and model.config.use_cache is True
    _, layers = find_decoder_layers(model)
    assert all("forward" not in layer.__dict__ for layer in layers)  # recorders removed


# -- 5. overrides and errors -------------------------------------------------------------------------------


def test_override_dense_mlp():
    model = build("llama")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    report = sparsekern.prune(model, method="sparsegpt", sparsity="2:4", calib=calibration_ids(),
                              overrides={"*.mlp.*": "dense"}, progress=False)
    assert report.linears and not any(".mlp." in r.name for r in report.linears)
    for name, param in model.named_parameters():
        if ".mlp." in name:
            assert torch.equal(param, before[name]), name
        elif name.endswith("_proj.weight"):
            assert (param == 0).float().mean() == 0.5, name


def test_override_pattern_per_layer():
    model = build("llama")
    sparsekern.prune(model, method="magnitude", sparsity=0.5,
                     overrides={"*.down_proj": "2:4", "model.layers.1.*": "dense"}, progress=False)
    assert (model.model.layers[0].mlp.down_proj.weight.reshape(32, -1, 4) == 0).sum(-1).eq(2).all()
    assert (model.model.layers[1].self_attn.q_proj.weight != 0).all()


def test_nm_not_dividing_input_dim_names_the_layer():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=36, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )).eval()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj.*36.*M=8"):
        sparsekern.prune(model, method="sparsegpt", sparsity="4:8", calib=calibration_ids(), progress=False)
    # Shapes are checked before any work: nothing was pruned.
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    # The fix the message suggests works.
    sparsekern.prune(model, method="sparsegpt", sparsity="4:8", calib=calibration_ids(),
                     overrides={"*.down_proj": "dense"}, progress=False)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("target", ["self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj"])
def test_nan_weight_names_the_layer(method, target):
    model = build("llama")
    module = model.model.layers[1].get_submodule(target)
    with torch.no_grad():
        module.weight[3, 5] = float("nan")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    # The damaged weight itself is named (not a linear downstream whose activations it poisoned)...
    with pytest.raises(FloatingPointError, match=rf"model\.layers\.1\.{target.replace('.', '[.]')}\b.*weight"):
        sparsekern.prune(model, method=method, calib=calibration_ids(), progress=False)
    # ...and it is found before layer 0 is pruned in place.
    for name, param in model.named_parameters():
        assert torch.allclose(param, before[name], rtol=0, atol=0, equal_nan=True), name


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_nan_embeddings_name_the_layer(method):
    model = build("qwen2")
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = float("nan")
    with pytest.raises(FloatingPointError, match=r"model\.layers\.0\b.*NaN"):
        sparsekern.prune(model, method=method, calib=calibration_ids(), progress=False)


@pytest.mark.parametrize("true_sequential", [False, True])
@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_layer_entirely_dense(method, true_sequential):
    """A layer whose linears are all overridden to dense is only run forward, not calibrated."""
    model = build("gemma2")
    before = {name: p.detach().clone() for name, p in model.model.layers[0].named_parameters()}
    report = sparsekern.prune(model, method=method, sparsity="2:4", calib=calibration_ids(), batch_size=BATCH,
                              true_sequential=true_sequential, overrides={"model.layers.0.*": "dense"},
                              progress=False)
    assert report.linears and all(r.name.startswith("model.layers.1.") for r in report.linears)
    assert all(torch.equal(p, before[name]) for name, p in model.model.layers[0].named_parameters())
    assert (model.model.layers[1].mlp.down_proj.weight == 0).float().mean() == 0.5


def test_uneven_last_batch():
    """5 samples in batches of 2: the last batch's recorded masks/positions have batch size 1."""
    model = build("gemma2")
    ids = torch.cat([calibration_ids(), calibration_ids(seed=2)[:1]])
    with torch.no_grad():
        reference = model(ids, output_hidden_states=True).hidden_states
    name, layers = find_decoder_layers(model)
    with torch.no_grad():
        hidden, calls = capture_layer_inputs(model, layers, list(ids.split(2)), torch.device("cpu"))
        driven = run_layers(layers, hidden, calls)
    assert [h.shape[0] for h in hidden] == [2, 2, 1]
    torch.testing.assert_close(driven[1], reference[1], rtol=1e-5, atol=1e-5)
    sparsekern.prune(model, method="sparsegpt", sparsity="2:4", calib=ids, batch_size=2, progress=False)


def test_instance_forward_hooks_survive():
    """accelerate (device_map models) wraps ``layer.forward`` on the instance; the driver swaps forwards while
    capturing and must put those wrappers back, not delete them."""
    accelerate_hooks = pytest.importorskip("accelerate.hooks")

    class Counting(accelerate_hooks.ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Counting.calls += 1
            return args, kwargs

    model = build("llama")
    for layer in model.model.layers:
        accelerate_hooks.add_hook_to_module(layer, Counting())
    sparsekern.prune(model, method="sparsegpt", sparsity=0.5, calib=calibration_ids(), progress=False)
    Counting.calls = 0
    with torch.no_grad():
        model(calibration_ids())
    assert Counting.calls == len(model.model.layers)


# -- 6. a non-HF model whose layers return tuples ----------------------------------------------------------


class TinyConfig:
    num_hidden_layers = 3
    use_cache = False


class TupleBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.gate = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, hidden_states, scale, *, shift):
        x = self.norm(hidden_states)
        y = self.down(torch.relu(self.up(x)) * torch.sigmoid(self.gate(x)))
        return (hidden_states + scale * y + shift,)


class TupleLM(nn.Module):
    """Layers return (hidden,); each layer gets its own scale and shift, passed positionally / by keyword.
    ``hidden_as_kwarg`` passes the hidden states as ``hidden_states=`` instead of positionally."""

    def __init__(self, width: int = 32, hidden_as_kwarg: bool = False):
        super().__init__()
        self.config = TinyConfig()
        self.hidden_as_kwarg = hidden_as_kwarg
        self.embed = nn.Embedding(VOCAB, width)
        self.layers = nn.ModuleList(TupleBlock(width) for _ in range(3))
        self.head = nn.Linear(width, VOCAB, bias=False)

    def forward(self, input_ids):  # no use_cache, no **kwargs: a plain module, not an HF model
        hidden = self.embed(input_ids)
        for index, layer in enumerate(self.layers):
            # Per-layer arguments built from the incoming hidden states' shape (as models build masks and
            # positions): while capturing, the stand-in layers must return what the real ones would, a tuple.
            batch, seqlen, _ = hidden.shape
            scale = torch.full((batch, seqlen, 1), 1.0 + index)
            shift = 0.1 * index
            if self.hidden_as_kwarg:
                hidden = layer(hidden_states=hidden, scale=scale, shift=shift)[0]
            else:
                hidden = layer(hidden, scale, shift=shift)[0]
        return self.head(hidden)


@pytest.mark.parametrize("hidden_as_kwarg", [False, True])
def test_tuple_output_model(hidden_as_kwarg):
    torch.manual_seed(0)
    model = TupleLM(hidden_as_kwarg=hidden_as_kwarg).eval()
    ids = calibration_ids()
    assert find_decoder_layers(model)[0] == "layers"

    # Capture is exact (per-layer scale/shift included).
    real_outputs = []
    hooks = [layer.register_forward_hook(lambda m, a, out: real_outputs.append(out[0])) for layer in model.layers]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    _, layers, hidden, calls = capture(model, ids)
    assert calls[0][0].hidden_as_kwarg is hidden_as_kwarg
    with torch.no_grad():
        driven = run_layers(layers, hidden, calls)
    for index in range(3):
        torch.testing.assert_close(driven[index + 1], real_outputs[index])

    # Pruning: the driver must feed each layer the pruned previous layer's output (a tensor, not a tuple).
    reference = copy.deepcopy(model)
    report = sparsekern.prune(model, method="sparsegpt", sparsity="2:4", calib=ids, batch_size=BATCH,
                              progress=False)
    assert len(report.linears) == 9
    for layer in model.layers:
        for linear in (layer.up, layer.gate, layer.down):
            assert ((linear.weight == 0).reshape(linear.weight.shape[0], -1, 4).sum(-1) >= 2).all()
    assert torch.equal(model.embed.weight, reference.embed.weight)
    assert torch.equal(model.head.weight, reference.head.weight)
    with torch.no_grad():
        assert torch.isfinite(model(ids)).all()
    with torch.no_grad():
        groups = input_groups(model.layers[0], find_linears(model.layers[0]),
                              lambda: calls[0][0](model.layers[0], hidden[0]))
    assert groups == [["up", "gate"], ["down"]]


@pytest.mark.parametrize("bos, starts_with_bos", [("auto", True), ("never", False)])
def test_gemma3_calibrates_on_bos_led_windows(bos_tokenizer, tmp_path, monkeypatch, bos, starts_with_bos):
    """A Gemma-3-style model with a tokenizer that adds BOS: every calibration window reaching the layers starts
    with it (unless --bos never), and sparsity.json's calibration record says so."""
    torch.manual_seed(0)
    model = _gemma(transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, vocab_size=130).eval()
    text = tmp_path / "calib.txt"
    text.write_text("Gemma sees a BOS token at the start of every training sequence. " * 20)
    seen = []
    real_prune_layers = sparsekern.api.prune_layers
    monkeypatch.setattr(sparsekern.api, "prune_layers",
                        lambda model, method, pattern, calibration, **kw: seen.append(calibration)
                        or real_prune_layers(model, method, pattern, calibration, **kw))
    report = sparsekern.prune(model, bos_tokenizer, method="wanda", calib=str(text), nsamples=4, seqlen=SEQLEN,
                              bos=bos, progress=False)
    (windows,) = seen
    assert windows.shape == (4, SEQLEN) and bool((windows[:, 0] == 129).all()) == starts_with_bos
    assert report.calibration["bos"] == bos
    assert report.calibration["bos_token_id"] == (129 if starts_with_bos else None)


def test_out_of_memory_names_the_layer_the_sizes_and_the_fixes(tiny_llama, monkeypatch):
    from sparsekern.prune.wanda import Wanda

    def out_of_memory(self, weight, prepared, pattern, where):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Wanda, "prune_linear", out_of_memory)
    calibration = torch.randint(0, VOCAB, (4, SEQLEN), generator=torch.Generator().manual_seed(0))
    with pytest.raises(MemoryError, match=r"model\.layers\.0: out of CPU memory \(CUDA out of memory.*2 batches of "
                                          r"\(2, 16, 32\) float32 activations.*kept on the CPU: lower --batch-size "
                                          r"\(now 2\) or --nsamples"):
        sparsekern.prune(tiny_llama, method="wanda", calib=calibration, batch_size=2, progress=False, device="cpu")
