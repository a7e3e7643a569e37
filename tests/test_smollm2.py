"""The real SmolLM2-135M (30 Llama layers), pruned on Lee news text: the methods must rank as published, and a
saved checkpoint must reload with plain transformers and give the same perplexity."""

import json

import pytest
import torch

import sparsekern
from sparsekern import cli
from sparsekern.data import calibration_windows, eval_tokens
from sparsekern.eval import perplexity
from sparsekern.models import load_model

SEQLEN = 256
# 1024 held-out tokens for the fast tests. Measured per 256-token window of the first 8 (16 x 256 calibration
# tokens): SparseGPT 50% beats Wanda 50% in every one by 0.08 to 0.36 nats; over the first 4 windows the
# perplexities are dense 31.8, SparseGPT 59.1, Wanda 74.6, magnitude 512 (over 8: 33.3, 59.4, 72.9, 530).
EVAL_WINDOWS = 4
# The kernel-vs-reference comparisons (slow) keep the 2048 tokens their tolerances were measured on.
BACKEND_EVAL_WINDOWS = 8


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    """The longest file of `make test`: both cores, even when pytest-xdist gave its worker one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def smollm2(smollm2_path, lee_available):
    model, tokenizer = load_model(smollm2_path, dtype="float32")
    dense = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    calibration = calibration_windows(tokenizer, "lee", nsamples=16, seqlen=SEQLEN, seed=0)
    held_out = eval_tokens(tokenizer, "lee", "test")
    return model, tokenizer, dense, calibration, held_out, held_out_perplexity(model, held_out)


def held_out_perplexity(model, held_out, windows=EVAL_WINDOWS):
    return perplexity(model, held_out, seqlen=SEQLEN, max_windows=windows, progress=False)["perplexity"]


def prune_each(smollm2, cases):
    """{"dense": ..., "<method> <pattern>": held-out perplexity} for whole-model prunes from the dense weights.

    SparseGPT needs the 16 x 256 calibration tokens: with the first 8 of them it gives 71.9 at 50% (Wanda 73.5,
    over 8 windows), too close; with the first 12, 63.2 (Wanda 75.1, over 4 windows, and it loses the third)."""
    model, tokenizer, dense, calibration, held_out, dense_perplexity = smollm2
    results = {"dense": dense_perplexity}
    try:
        for method, pattern in cases:
            model.load_state_dict(dense)
            report = sparsekern.prune(model, tokenizer, method=method, sparsity=pattern, calib=calibration,
                                      progress=False)
            assert report.sparsity >= 0.5 - 1e-4
            assert len(report.linears) == 30 * 7
            results[f"{method} {pattern}"] = held_out_perplexity(model, held_out)
    finally:
        model.load_state_dict(dense)
    print(results)
    return results


def test_perplexity_ranks_dense_sparsegpt_wanda_magnitude(smollm2):
    results = prune_each(smollm2, [("sparsegpt", "0.5"), ("wanda", "0.5"), ("magnitude", "0.5")])
    assert results["dense"] < results["sparsegpt 0.5"] <= results["wanda 0.5"] < results["magnitude 0.5"], results


@pytest.mark.slow
def test_perplexity_ranks_sparsegpt_over_magnitude_at_2_4(smollm2):
    """2:4 on the whole model (~3 min; the layer-level 2:4 ranking is in test_prune_quality's fast tests). Over
    the first 8 windows: SparseGPT 112.6, magnitude 1700."""
    results = prune_each(smollm2, [("sparsegpt", "2:4"), ("magnitude", "2:4")])
    assert results["dense"] < results["sparsegpt 2:4"] < results["magnitude 2:4"], results


def test_saved_checkpoint_reloads_with_plain_transformers(smollm2, smollm2_path, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model, tokenizer, dense, calibration, held_out, dense_perplexity = smollm2
    out = tmp_path / "pruned"
    code = cli.main(["prune", str(smollm2_path), "--method", "wanda", "--sparsity", "2:4", "--nsamples", "4",
                     "--seqlen", "64", "--out", str(out), "--json", "--quiet", "--device", "cpu"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "wanda" and summary["pattern"] == "2:4" and summary["out"] == str(out)
    # (a few kept weights of the 4-bit-derived checkpoint are exactly 0 already)
    assert 0.5 <= summary["sparsity"] < 0.501 and summary["time_s"] > 0

    record = json.loads((out / "sparsity.json").read_text())
    # SmolLM2's tokenizer adds no BOS token, so its windows are cut from the text as they always were.
    assert record["calibration"] == {"source": "lee", "nsamples": 4, "seqlen": 64, "seed": 0, "bos": "auto",
                                     "bos_token_id": None}
    assert record["sparsekern_version"] == sparsekern.__version__
    assert len(record["layers"]) == 30 * 7 and all(layer["sparsity"] >= 0.5 for layer in record["layers"])

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    weight = reloaded.model.layers[5].mlp.down_proj.weight
    assert ((weight == 0).reshape(weight.shape[0], -1, 4).sum(-1) >= 2).all()
    in_process = held_out_perplexity(reloaded, held_out)
    code = cli.main(["eval", str(out), "--seqlen", str(SEQLEN), "--max-windows", str(EVAL_WINDOWS), "--json",
                     "--quiet", "--device", "cpu"])
    assert code == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["perplexity"] == pytest.approx(in_process, rel=1e-5)
    assert evaluated["tokens"] == EVAL_WINDOWS * (SEQLEN - 1)
    assert in_process > dense_perplexity  # pruning 2:4 costs some perplexity


def prune_with_each_backend(smollm2, method, pattern, overrides=None):
    """{backend: held-out perplexity} after pruning with the reference ops ("torch") and the interpreted
    Triton kernels ("interpret"), from the same dense weights and calibration windows."""
    model, tokenizer, dense, calibration, held_out, dense_perplexity = smollm2
    results = {}
    previous = sparsekern.get_backend()
    try:
        for backend in ["torch", "interpret"]:
            sparsekern.set_backend(backend)
            model.load_state_dict(dense)
            sparsekern.prune(model, tokenizer, method=method, sparsity=pattern, calib=calibration,
                             overrides=overrides, progress=False)
            results[backend] = held_out_perplexity(model, held_out, BACKEND_EVAL_WINDOWS)
    finally:
        sparsekern.set_backend(previous)
        model.load_state_dict(dense)
    print(method, pattern, results)
    assert results["torch"] != held_out_perplexity(model, held_out, BACKEND_EVAL_WINDOWS)  # the dense model's
    return results


@pytest.mark.slow
def test_fused_sparsegpt_gives_the_reference_perplexity(smollm2):
    """SparseGPT 50% on the whole model with the kernels (interpreted; ~25 min) vs the reference ops.

    Not bit-identical, and not closer than about 1%: SparseGPT's adaptive masks make the whole run chaotic under
    fp32 rounding. Measured on this set-up (16 x 256 Lee tokens), all with equivalent fp32 arithmetic: the
    reference gives 59.40, 59.48 and 59.56 with calibration batches of 4, 16 and 8 windows (only the Hessian's
    summation order changes); the reference with the kernel sweep alone 59.32 (its weights agree to 2e-7 per
    layer); with the kernel Hessian alone 60.14 (which is as accurate as the reference's against fp64); with
    every kernel 59.94. A wrong update or mask would cost far more (magnitude pruning: ~500)."""
    results = prune_with_each_backend(smollm2, "sparsegpt", "0.5")
    assert results["interpret"] == pytest.approx(results["torch"], rel=0.01), results


@pytest.mark.slow
@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_fused_wanda_gives_the_reference_perplexity(smollm2, pattern):
    """Wanda with the kernels (interpreted; the first two decoder layers, the rest dense) vs the reference."""
    overrides = {"model.layers.*": "dense", "model.layers.[01].*": pattern}
    results = prune_with_each_backend(smollm2, "wanda", pattern, overrides)
    assert results["interpret"] == pytest.approx(results["torch"], rel=0.005), results
