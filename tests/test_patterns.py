import re

import pytest

from sparsekern.patterns import SparsityPattern, resolve_pattern


@pytest.mark.parametrize(
    "spec, sparsity, n, m",
    [("0.5", 0.5, 0, 0), (0.6, 0.6, 0, 0), ("0", 0.0, 0, 0), ("2:4", 0.5, 2, 4), ("4:8", 0.5, 4, 8), ("1:4", 0.25, 1, 4)],
)
def test_parse(spec, sparsity, n, m):
    pattern = SparsityPattern.parse(spec)
    assert (pattern.sparsity, pattern.n, pattern.m) == (sparsity, n, m)
    assert SparsityPattern.parse(str(pattern)) == pattern


@pytest.mark.parametrize("spec, words", [
    ("1.0", "outside [0, 1)"), ("-0.1", "outside [0, 1)"), ("4:4", "0 < N < M"), ("5:4", "0 < N < M"),
    ("0:4", "0 < N < M"), ("a:b", "two integers"), ("half", "neither a ratio"),
])
def test_parse_errors(spec, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        SparsityPattern.parse(spec)


def test_check_columns_names_the_layer():
    with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp\.down_proj.*30.*M=4"):
        SparsityPattern.parse("2:4").check_columns(30, "model.layers.3.mlp.down_proj")
    SparsityPattern.parse("2:4").check_columns(32, "x")
    SparsityPattern.parse("0.5").check_columns(30, "x")


def test_overrides_last_match_wins():
    default = SparsityPattern.parse("0.5")
    overrides = {"*.mlp.*": "2:4", "*.layers.0.*": "dense", "*.layers.0.mlp.up_proj": 0.7}
    assert resolve_pattern("m.layers.1.self_attn.q_proj", default, overrides) == default
    assert resolve_pattern("m.layers.1.mlp.up_proj", default, overrides) == SparsityPattern.parse("2:4")
    assert resolve_pattern("m.layers.0.mlp.gate_proj", default, overrides) is None
    assert resolve_pattern("m.layers.0.mlp.up_proj", default, overrides) == SparsityPattern.parse(0.7)
