"""Sparsity patterns, parsed and validated once.

Two kinds:
- unstructured: a ratio in [0, 1), written ``"0.5"`` (or ``0.5``): that fraction of a layer's weights is zero.
- N:M: ``"2:4"``, ``"4:8"``, ...: at least N of every M consecutive weights along the input dimension are zero
  (so ``"2:4"`` is 50% sparse). This is the convention of the SparseGPT and Wanda code (``prunen``/``prunem``),
  and 2:4 is the pattern NVIDIA's sparse tensor cores accelerate.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Mapping, Union


@dataclasses.dataclass(frozen=True)
class SparsityPattern:
    """A validated sparsity pattern. Build it with :meth:`parse`."""

    sparsity: float  # fraction of zeros: the ratio, or n/m for N:M
    n: int = 0  # zeros per group of m (0 = unstructured)
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @classmethod
    def parse(cls, spec: Union[str, float, "SparsityPattern"]) -> "SparsityPattern":
        if isinstance(spec, SparsityPattern):
            return spec
        text = str(spec).strip()
        if ":" in text:
            left, _, right = text.partition(":")
            try:
                n, m = int(left), int(right)
            except ValueError:
                raise ValueError(f"sparsity {text!r}: N:M needs two integers, e.g. '2:4' or '4:8'") from None
            if not 0 < n < m:
                raise ValueError(
                    f"sparsity {text!r}: N:M needs 0 < N < M (N zeros in every M weights), e.g. '2:4' or '4:8'"
                )
            return cls(sparsity=n / m, n=n, m=m)
        try:
            ratio = float(text)
        except ValueError:
            raise ValueError(
                f"sparsity {text!r} is neither a ratio in [0, 1) such as '0.5' nor an N:M pattern such as '2:4'"
            ) from None
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"sparsity {text!r} is outside [0, 1): pass the fraction of zeros, e.g. '0.5'")
        return cls(sparsity=ratio)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:g}"

    def check_columns(self, columns: int, where: str) -> None:
        """Raise if an N:M pattern does not tile an input dimension of ``columns``, naming ``where``."""
        if self.is_nm and columns % self.m:
            raise ValueError(
                f"{where}: input dimension {columns} is not divisible by M={self.m} of pattern {self}; "
                f"exclude this layer (an override such as '{where}=dense') or use an unstructured ratio"
            )


PatternSpec = Union[str, float, SparsityPattern]

DENSE_WORDS = ("dense", "none", "skip")


def resolve_pattern(
    name: str, default: SparsityPattern, overrides: Mapping[str, PatternSpec | None] | None
) -> SparsityPattern | None:
    """The pattern for the module ``name``: the last matching override wins; None means leave it dense.

    Override keys are shell-style globs over full module names (``"*.mlp.down_proj"``, ``"model.layers.0.*"``);
    values are patterns, or None / "dense" to skip the module.
    """
    chosen: SparsityPattern | None = default
    for glob, spec in (overrides or {}).items():
        if fnmatch.fnmatchcase(name, glob):
            if spec is None or str(spec).strip().lower() in DENSE_WORDS:
                chosen = None
            else:
                chosen = SparsityPattern.parse(spec)
    return chosen
