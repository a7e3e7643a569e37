"""Comparison helpers for kernel tests: tolerances per dtype and diffs that name the worst element."""

from __future__ import annotations

import torch

# Inputs in a low-precision dtype are rounded the same way for kernel and reference (both compute in fp32), so
# differences come from fp32 evaluation order only; the loose half-precision entries cover outputs stored in it.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


def assert_close(got: torch.Tensor, expected: torch.Tensor, what: str, atol: float = None, rtol: float = None,
                 dtype: torch.dtype = torch.float32) -> None:
    """assert_close that first rejects unwritten (NaN) outputs and reports the worst index by name."""
    default_atol, default_rtol = TOLERANCES[dtype]
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    got64, expected64 = got.double(), expected.double()
    unwritten = torch.isnan(got64) & ~torch.isnan(expected64)
    assert not unwritten.any(), f"{what}: {int(unwritten.sum())} elements NaN (never written?), first at " \
                                f"{tuple(unwritten.nonzero()[0].tolist())}"
    excess = (got64 - expected64).abs() - (atol + rtol * expected64.abs())
    if (excess > 0).any():
        index = tuple(torch.unravel_index(excess.argmax(), excess.shape))
        index = tuple(int(i) for i in index)
        raise AssertionError(
            f"{what}: {int((excess > 0).sum())}/{excess.numel()} elements out of tolerance (atol {atol}, rtol "
            f"{rtol}); worst at {index}: got {got64[index].item():.8g}, expected {expected64[index].item():.8g}"
        )


def assert_mask(got: torch.Tensor, what: str) -> None:
    """A kernel's bool mask holds only 0/1 bytes (poisoned 0x7F bytes mean elements never written)."""
    assert got.dtype == torch.bool, f"{what}: dtype {got.dtype}, expected torch.bool"
    bad = got.view(torch.uint8) > 1
    assert not bad.any(), f"{what}: {int(bad.sum())} mask bytes never written, first at " \
                          f"{tuple(bad.nonzero()[0].tolist())}"


def group_has_ties(scores: torch.Tensor, m: int) -> torch.Tensor:
    """[rows, groups] bool: the group of m consecutive scores holds two equal scores."""
    groups = scores.reshape(scores.shape[0], -1, m)
    diffs = groups.unsqueeze(-1) == groups.unsqueeze(-2)
    return diffs.sum((-1, -2)) > m  # the diagonal alone gives m


def check_nm_selection(scores: torch.Tensor, mask: torch.Tensor, n: int, m: int) -> None:
    """Exactly n pruned per group, and every kept score >= every pruned score of its group."""
    rows, cols = scores.shape
    groups, picked = scores.reshape(rows, cols // m, m), mask.reshape(rows, cols // m, m)
    assert (picked.sum(-1) == n).all(), "not exactly N pruned in every group"
    highest_pruned = groups.masked_fill(~picked, float("-inf")).amax(-1)
    lowest_kept = groups.masked_fill(picked, float("inf")).amin(-1)
    assert (lowest_kept >= highest_pruned).all(), "a kept score is below a pruned one"


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``sparsekern`` run in-process; argparse's own refusals exit via SystemExit."""
    from sparsekern import cli

    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tiny_llama_checkpoint(folder, layers: int = 2):
    """A random 32-wide Llama (untied head, grouped KV heads) saved with a character tokenizer; returns the folder."""
    from conftest import _make_char_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=129, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(folder)
    _make_char_tokenizer().save_pretrained(folder)
    return folder
