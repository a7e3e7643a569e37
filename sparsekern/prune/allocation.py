"""Layer-wise sparsity allocation: how much of the target sparsity each decoder layer takes.

Every allocation returns one sparsity per decoder layer whose average, weighted by the parameters each layer
prunes with the default pattern, is exactly the target (:func:`rebalance`). The driver (``sparsekern.allocate``)
gives each step what it asks for:

- ``owl`` (Yin et al., ICML 2024, "Outlier Weighed Layerwise sparsity"): layers with more outliers keep more
  weights. A layer's outlier ratio is the fraction of its Wanda scores |W_ij| * ||X_j|| above ``owl_threshold``
  times their mean (dense model, calibration inputs); the ratios are scaled to [0, 2 * owl_lambda] and centred, and
  a layer's sparsity is the target minus its centred ratio.
- ``sensitivity``: a schedule fitted to the model on calibration data alone. Candidate schedules rise (or fall)
  linearly with depth, s_i = target + delta * (2 i / (L - 1) - 1); each is tried by pruning with Wanda's masks
  (cheap: one forward pass over the calibration windows per candidate) and scoring the model's loss on the
  calibration windows; the lowest wins. The slopes 0, 0.08 and 0.16 are tried, then the two neighbours (+-0.04) of
  the best of them. The fixed depth schedule OWL's rule would need is chosen per model. The fit runs on the first
  ``sensitivity_windows`` calibration windows only (its passes are the allocation's whole cost; the pruning itself
  still uses every window).
- a JSON file: the user's own map {layer index or name: sparsity}; its weighted average must be the target.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Optional

import torch

from .base import Step
from .registry import option, register

# The depth slopes the sensitivity fit may try (the trial on SmolLM2 at 70% found +0.08 best: 0.62 to 0.78): first
# the coarse ones, then the two neighbours of the best of them, so five calibration passes instead of seven. The
# range stops at 0.16 on purpose: a search that went on past it while the calibration loss fell chose 0.20 on
# SmolLM2 (seed 2) and Gemma-3-270M (seed 0) at 70%, and SparseGPT's held-out perplexity got worse there (243.7 vs
# 235.5 and 145.9 vs 142.7 at 0.16): the Wanda-masked loss keeps rewarding steeper schedules than suit SparseGPT.
SENSITIVITY_SLOPES = (-0.08, -0.04, 0.0, 0.04, 0.08, 0.12, 0.16)
COARSE_SLOPES = (0.0, 0.08, 0.16)


def rebalance(sparsities: list[float], weights: list[float], target: float) -> list[float]:
    """Shift ``sparsities`` by one constant so that their ``weights``-weighted mean is exactly ``target``."""
    total = sum(weights)
    mean = sum(s * w for s, w in zip(sparsities, weights)) / total
    return [s + target - mean for s in sparsities]


def check_range(sparsities: list[float], where: str) -> None:
    bad = [(i, s) for i, s in enumerate(sparsities) if not 0.0 <= s < 1.0]
    if bad:
        i, s = bad[0]
        raise ValueError(f"{where} gives layer {i} sparsity {s:.4f}, outside [0, 1): lower the target --sparsity or "
                         "the allocation's spread (e.g. --owl-lambda)")


class Allocation(Step):
    """A registered allocation: ``allocate(context)`` returns one sparsity per decoder layer."""

    kind = "allocation"
    needs = frozenset()  # what the driver's dense pass must collect ("norm")

    def calibration_windows(self) -> int:
        """How many of the calibration windows (the first ones) its passes use; 0: all."""
        return 0

    def allocate(self, context: "AllocationContext") -> list[float]:
        raise NotImplementedError


@dataclasses.dataclass
class AllocationContext:
    """What an allocation sees: the target, each layer's pruned-parameter weight, and on demand the dense model's
    Wanda scores per layer and a calibration loss for a candidate allocation."""

    target: float
    weights: list[float]  # per layer: the parameters pruned with the default pattern
    layer_scores: Optional[Callable] = None  # () -> list[list[Tensor]]: per layer, the Wanda scores of its pruned linears
    calibration_loss: Optional[Callable] = None  # (sparsities) -> float: the loss after Wanda masks at these sparsities


@dataclasses.dataclass
class OWLOptions:
    owl_threshold: float = option(5.0, "OWL: a score is an outlier above this many times its layer's mean score",
                                  check=lambda m: None if m > 0 else "must be positive")
    owl_lambda: float = option(0.08, "OWL: the layers' sparsities spread over target +- this",
                               check=lambda lam: None if 0 <= lam < 0.5 else "must lie in [0, 0.5)")


def owl_sparsities(outlier_ratios: list[float], weights: list[float], target: float, lam: float) -> list[float]:
    """OWL's rule: ratios scaled to [0, 2 lam], the layers with more outliers pruned less, rebalanced."""
    low, high = min(outlier_ratios), max(outlier_ratios)
    spread = high - low
    scaled = [(r - low) / spread * 2 * lam if spread > 0 else 0.0 for r in outlier_ratios]
    return rebalance([target - s for s in scaled], weights, target)


@register
class OWL(Allocation):
    name = "owl"
    Options = OWLOptions
    needs = frozenset({"norm"})

    def allocate(self, context):
        ratios = []
        for scores in context.layer_scores():
            flat = torch.cat([s.flatten().float() for s in scores])
            ratios.append(float((flat > self.opts.owl_threshold * flat.mean()).float().mean()))
        sparsities = owl_sparsities(ratios, context.weights, context.target, self.opts.owl_lambda)
        check_range(sparsities, "--allocation owl")
        self.outlier_ratios = ratios
        return sparsities


def depth_schedule(layers: int, target: float, slope: float, weights: list[float]) -> list[float]:
    """s_i = target + slope * (2 i / (L - 1) - 1), rebalanced to the exact weighted target."""
    if layers == 1:
        return [target]
    return rebalance([target + slope * (2 * i / (layers - 1) - 1) for i in range(layers)], weights, target)


@dataclasses.dataclass
class SensitivityOptions:
    sensitivity_windows: int = option(
        4, "sensitivity: the depth slope is fitted on the first this many calibration windows (0: all of them); "
        "each candidate slope costs one forward pass over them",
        check=lambda n: None if n >= 0 else "must be 0 (all windows) or a positive count")


@register
class Sensitivity(Allocation):
    name = "sensitivity"
    Options = SensitivityOptions
    needs = frozenset({"norm"})

    def calibration_windows(self) -> int:
        return self.opts.sensitivity_windows

    def allocate(self, context):
        layers = len(context.weights)
        candidates = {}
        for slope in SENSITIVITY_SLOPES:
            sparsities = depth_schedule(layers, context.target, slope, context.weights)
            if all(0.0 <= s < 0.99 for s in sparsities):
                candidates[slope] = sparsities
        self.losses = {}

        def tried(slopes):
            for slope in slopes:
                if slope in candidates and slope not in self.losses:
                    self.losses[slope] = context.calibration_loss(candidates[slope])

        tried(COARSE_SLOPES)
        if not self.losses:  # a target so high that even the flat schedule is refused: take the smallest slopes
            tried(sorted(candidates, key=abs)[:1])
        best = min(self.losses, key=self.losses.get)
        step = SENSITIVITY_SLOPES.index(best)
        tried(SENSITIVITY_SLOPES[max(0, step - 1):step + 2])  # the neighbours of the best coarse slope
        self.slope = min(self.losses, key=self.losses.get)
        return candidates[self.slope]

    def options(self):
        fitted = {"slope": self.slope, "calibration_losses": self.losses} if hasattr(self, "slope") else {}
        return {**super().options(), **fitted}


def from_file(path: str, layer_names: list[str], weights: list[float], target: float) -> list[float]:
    """A user's per-layer map: JSON {layer index or full layer name: sparsity}; unnamed layers take the target.
    Its weighted average must be the target (within 1e-6): an allocation never changes the model's sparsity."""
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--allocation {path}: cannot read it as JSON ({exc})") from None
    if not isinstance(content, dict):
        raise ValueError(f"--allocation {path}: expected an object {{layer index or name: sparsity}}")
    sparsities = [target] * len(layer_names)
    for key, value in content.items():
        index = int(key) if str(key).isdigit() else (layer_names.index(key) if key in layer_names else None)
        if index is None or not 0 <= index < len(layer_names):
            raise ValueError(f"--allocation {path}: {key!r} is not a decoder layer (use 0..{len(layer_names) - 1} "
                             f"or names like {layer_names[0]!r})")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"--allocation {path}: layer {key!r} has {value!r}, not a number")
        sparsities[index] = float(value)
    check_range(sparsities, f"--allocation {path}")
    mean = sum(s * w for s, w in zip(sparsities, weights)) / sum(weights)
    if abs(mean - target) > 1e-6:
        raise ValueError(f"--allocation {path} averages {mean:.6f} over the pruned parameters, not the target "
                         f"--sparsity {target:g}: shift its values, or pass --sparsity {mean:.6f}")
    return sparsities
